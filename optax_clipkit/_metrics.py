"""`clipkit.metrics`: what the last update did, read from any optax state."""

from __future__ import annotations

from typing import Any

import jax

# State class -> the names of its fields that are metrics (scalars).
_METRIC_FIELDS: dict[type, tuple[str, ...]] = {}


def register_state(cls: type, *fields: str) -> type:
  """Declares `fields` of the NamedTuple `cls` as metrics read by `metrics`."""
  missing = set(fields) - set(cls._fields)  # pytype: disable=attribute-error
  if missing:
    raise AssertionError(f"{cls.__name__} has no fields {sorted(missing)}.")
  _METRIC_FIELDS[cls] = fields
  return cls


def _is_clip_state(x: Any) -> bool:
  return type(x) in _METRIC_FIELDS


def _key_name(key: Any) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _prefixes(paths: list[tuple[str, ...]]) -> list[str]:
  """The path parts that tell the states apart, joined with '/'.

  Parts shared by all paths at their start or at their end (wrappers such as
  ``inner_state``) are dropped.
  """
  start = 0
  shortest = min(len(p) for p in paths)
  while start < shortest and len({p[start] for p in paths}) == 1:
    start += 1
  end = 0
  while (start + end + 1 < shortest
         and len({p[len(p) - end - 1] for p in paths}) == 1):
    end += 1
  return ["/".join(p[start:len(p) - end]) for p in paths]


def metrics(opt_state: Any) -> dict[str, jax.Array]:
  """Returns what the clipkit transformations did in the last update.

  Searches `opt_state`, however nested (`optax.chain`, `optax.named_chain`,
  `optax.inject_hyperparams`, `optax.MultiSteps`, `optax.partition`,
  `clipkit.per_module`, ...), for the states of clipkit transformations and
  returns their metrics: float32 scalars computed inside the jitted update, so
  this works inside `jax.jit` and `lax.scan` and costs nothing extra.

  Keys, for the norm-based strategies:

  - ``grad_norm``: L2 norm of the incoming updates, before clipping.
  - ``clip_threshold``: the threshold the norm was clipped to.
  - ``clip_scale``: the factor the updates were multiplied by (1.0 when not
    clipped; for `per_leaf_norm`, the smallest factor of any leaf).

  `value` reports ``clip_threshold`` and ``clipped_fraction`` (the fraction of
  elements that were clipped; absent with ``count_clipped=False``);
  `per_leaf_norm` adds ``clipped_fraction`` (the fraction of leaves that were
  clipped). Adaptive strategies add their own statistics. Before the first
  update every metric holds its initial value (zero, and 1.0 for
  ``clip_scale``).

  With one clipkit state the keys are plain (``metrics(s)["grad_norm"]``).
  With several, each key is prefixed by the part of the state's path in
  `opt_state` that tells them apart, joined with ``/``: in
  ``optax.chain(clipkit.value(1.0), clipkit.global_norm(1.0), optax.sgd(0.1))``
  the keys are ``"0/clip_threshold"``, ``"1/grad_norm"`` and so on; in
  `per_module`, the group names (``"head/grad_norm"``). A state holding no
  clipkit transformation gives an empty dict.

  Args:
    opt_state: The state of an optax transformation, e.g. from
      ``tx.init(params)`` or ``tx.update(...)``.

  Returns:
    A dict mapping metric names to float32 scalars.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_clipkit as clipkit
    >>> tx = optax.chain(clipkit.global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> m = clipkit.metrics(state)
    >>> round(float(m["grad_norm"]), 4), round(float(m["clip_scale"]), 4)
    (5.0, 0.2)
  """
  found = jax.tree_util.tree_flatten_with_path(
      opt_state, is_leaf=_is_clip_state
  )[0]
  states = [(p, s) for p, s in found if _is_clip_state(s)]
  if not states:
    return {}
  paths = [tuple(_key_name(k) for k in p) for p, _ in states]
  prefixes = [""] if len(states) == 1 else [n + "/" for n in _prefixes(paths)]
  out = {}
  for prefix, (_, state) in zip(prefixes, states):
    for field in _METRIC_FIELDS[type(state)]:
      value = getattr(state, field)
      if hasattr(value, "get_value") and not isinstance(value, jax.Array):
        # An `nnx.Optimizer` wraps each leaf of its state in a mutable
        # Variable; return the array it holds now, not the Variable.
        value = value.get_value()
      if value is not None:  # A metric turned off.
        out[prefix + field] = value
  return out
