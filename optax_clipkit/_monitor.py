"""`monitor`: per-group diagnostics of the updates and parameters, in state.

The groups are fixed by the tree's structure when the state is initialised;
their names live in the state's class (see `_metrics.tag`), their values in
float32 vectors with one entry per group, which `metrics` expands into keys.
Norms are the shared overflow-safe ones of `_numerics`: one per leaf, in one
pass, then combined per group.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_clipkit import _metrics
from optax_clipkit import _numerics
from optax_clipkit import _per_module
from optax_clipkit import _validation

_OTHER = "other"
_ROOT = "all"  # The group of a tree that is one array.
_GROUPS = "_clipkit_groups"
_SKIP = "_clipkit_group_skip"


class MonitorState(NamedTuple):
  """State of `monitor`: one float32 entry per group, from the last update.

  Attributes:
    update_norm: L2 norm of the group's incoming updates.
    param_norm: L2 norm of the group's parameters (0 without `params`).
    update_param_ratio: ``update_norm / param_norm`` (0 where `param_norm`
      is 0).
    nonfinite_leaves: Number of the group's leaves whose incoming updates
      hold a NaN or an infinity.
  """

  update_norm: jax.Array
  param_norm: jax.Array
  update_param_ratio: jax.Array
  nonfinite_leaves: jax.Array


_metrics.register_state(
    MonitorState,
    "update_norm",
    "param_norm",
    "update_param_ratio",
    "nonfinite_leaves",
    labels=_GROUPS,
)


_GROUPS_ARE = ("a sequence of patterns or (pattern, name) pairs, or a"
               " mapping from pattern to name")


def _parse_groups(groups) -> list[tuple[str, re.Pattern]]:
  items = _validation.entries(
      "groups", groups, _GROUPS_ARE,
      " (a single pattern goes in a list: [pattern])")
  parsed, names = [], set()
  for item in items:
    pattern, name = (item, item) if isinstance(item, str) else (None, None)
    if isinstance(item, tuple) and len(item) == 2:
      pattern, name = item
    if not isinstance(pattern, str) or not isinstance(name, str):
      raise TypeError(f"`groups` must be {_GROUPS_ARE}, got item {item!r}.")
    compiled = _per_module.compile_pattern(pattern, "Group")
    if name in names or name == _OTHER:
      raise ValueError(f"Group name {name!r} is used twice (or is reserved).")
    names.add(name)
    parsed.append((name, compiled))
  if not parsed:
    raise ValueError(f"`groups` must hold at least one group, got {groups!r}.")
  return parsed


def _paths(tree) -> list[str]:
  return [_per_module.leaf_path(p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _common_depth(paths: list[str]) -> int:
  """How many leading path parts all `paths` share (``params`` for Linen)."""
  parts = [p.split("/") for p in paths]
  depth = 0
  while (parts and all(len(p) > depth + 1 for p in parts)
         and len({p[depth] for p in parts}) == 1):
    depth += 1
  return depth


def _top(path: str, skip: int) -> str:
  parts = path.split("/")
  # A bare array is a tree whose one leaf has the empty path.
  return parts[min(skip, len(parts) - 1)] or _ROOT


def monitor(
    groups: Mapping[str, str] | Sequence[Any] | None = None,
    *,
    axis_name: _numerics.AxisName = None,
    name: str = "monitor",
) -> optax.GradientTransformation:
  r"""Records per-group norms of the updates and parameters; changes nothing.

  An identity transformation whose state holds, for each group of leaves,
  the L2 norm of the incoming updates, the L2 norm of the parameters, their
  ratio and the number of leaves whose updates are not finite. Placed before
  the optimizer it watches the gradients; placed after it, the steps (the
  update/parameter ratio of a healthy layer is small and steady; one that
  grows shows a layer running away before the loss does).

  **Groups.** By default, one per top-level module: the first part of the
  leaf paths that tells them apart (``Dense_0`` for a Linen tree
  ``{"params": {"Dense_0": ...}}``, ``encoder`` for an NNX state; ``all``
  for a tree that is one array). Leaf
  paths are those of :func:`per_module`. With `groups`, regular expressions
  searched in the leaf paths, in order; the first that matches a leaf takes
  it, and leaves no pattern matches form the group ``"other"``. The groups
  are fixed by the tree's structure at ``init``.

  **Metrics.** :func:`optax_clipkit.metrics` reports
  ``"<name>/<group>/update_norm"``, ``.../param_norm``,
  ``.../update_param_ratio`` and ``.../nonfinite_leaves``, wherever the
  monitor sits. Give two monitors distinct names.

  Its cost is one pass of per-leaf norms over the updates and parameters
  together (float32, overflow-safe); the non-finite leaves are read off
  those norms. Nothing leaves the device.

  Args:
    groups: None for the top-level modules; else a sequence of patterns (each
      group named by its pattern), of ``(pattern, name)`` pairs, or a mapping
      from pattern to name.
    axis_name: Mapped axis name(s) over which the norms and counts are global
      under `shard_map`/`pmap`; see :func:`global_norm`.
    name: The prefix of the metric keys.

  Returns:
    An `optax.GradientTransformation` with state `MonitorState` (vectors with
    one entry per group).

  Raises:
    ValueError: For a malformed or duplicated group, or at ``init`` if a
      pattern matches no leaf of a non-empty tree.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_clipkit as clipkit
    >>> params = {"params": {"Dense_0": {"kernel": jnp.ones(4)},
    ...                      "Dense_1": {"kernel": jnp.ones(1)}}}
    >>> tx = optax.chain(clipkit.monitor(), optax.sgd(0.1))
    >>> grads = {"params": {"Dense_0": {"kernel": jnp.full(4, 0.5)},
    ...                     "Dense_1": {"kernel": jnp.array([3.0])}}}
    >>> _, state = tx.update(grads, tx.init(params), params)
    >>> m = clipkit.metrics(state)
    >>> float(m["monitor/Dense_0/update_norm"]), float(m["monitor/Dense_1/param_norm"])
    (1.0, 1.0)
  """
  rules = None if groups is None else _parse_groups(groups)

  def labels(paths: list[str], skip: int) -> list[str]:
    if rules is None:
      return [_top(p, skip) for p in paths]
    return [next((n for n, pat in rules if pat.search(p)), _OTHER)
            for p in paths]

  def init_fn(params):
    paths = _paths(params)
    skip = _common_depth(paths)
    found = labels(paths, skip)
    if rules is None:
      names = list(dict.fromkeys(found))
    else:
      unused = [pat.pattern for n, pat in rules if n not in found]
      if unused and paths:
        raise ValueError(
            f"Group pattern(s) {unused} match no leaf. The leaf paths are"
            f" e.g. {paths[:5]}."
        )
      names = [n for n, _ in rules] + ([_OTHER] if _OTHER in found else [])
    zero = jnp.zeros((len(names),), jnp.float32)
    return _metrics.tag(MonitorState(zero, zero, zero, zero),
                        **{_GROUPS: tuple(names), _SKIP: skip})

  def grouped(tree, names, skip):
    """The leaves of `tree` and the index of each one's group."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
    found = labels([_per_module.leaf_path(p) for p, _ in leaves_with_path],
                   skip)
    for label in found:
      if label not in names:
        raise ValueError(
            f"A leaf of group {label!r} is not among the groups found at init"
            f" {list(names)}: the tree's structure changed since init."
        )
    return [leaf for _, leaf in leaves_with_path], [names.index(label)
                                                     for label in found]

  def update_fn(updates, state, params=None):
    cls = type(state)
    names, skip = getattr(cls, _GROUPS), getattr(cls, _SKIP)
    g = len(names)
    leaves, index = grouped(updates, names, skip)
    n_updates = len(leaves)
    if params is not None:  # Its groups are numbered after the updates'.
      p_leaves, p_index = grouped(params, names, skip)
      leaves, index = leaves + p_leaves, index + [g + i for i in p_index]
    # One pass: every leaf's norm at once, then each group's from its leaves'.
    per_leaf = _numerics.norms(leaves, axis_name, per_leaf=True)
    totals = []
    for group in range(2 * g):
      idx = jnp.asarray([i for i, j in enumerate(index) if j == group],
                        jnp.int32)
      part = _numerics.Norm(*(x[idx] for x in per_leaf))
      totals.append(_numerics.as_f32(_numerics.total_norm(part).value))
    totals = jnp.stack(totals) if totals else jnp.zeros((0,), jnp.float32)
    update_norm, param_norm = totals[:g], totals[g:]
    ratio = update_norm / jnp.where(param_norm > 0, param_norm, 1.0)
    ratio = jnp.where(param_norm > 0, ratio, 0.0)
    # A leaf's scaled norm is finite exactly when all its elements are.
    bad = (~jnp.isfinite(per_leaf.scaled)).astype(jnp.float32)
    nonfinite = jnp.zeros((g,), jnp.float32).at[
        jnp.asarray(index[:n_updates], jnp.int32)].add(bad[:n_updates])
    return updates, _metrics.tag(
        MonitorState(update_norm, param_norm, ratio, nonfinite),
        **{_GROUPS: names, _SKIP: skip},
    )

  return _metrics.named(optax.GradientTransformation(init_fn, update_fn), name)
