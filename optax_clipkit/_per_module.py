"""Per-module rules: a clipping transformation per group of parameters."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
import optax

from optax_clipkit import _metrics
from optax_clipkit import _validation
from optax_clipkit import _value

Rule = Union[optax.GradientTransformation, tuple[float, float]]
_DEFAULT = "default"
_SHOWN = 5  # Unmatched paths shown in full in an error message.


def leaf_path(path: Sequence[Any]) -> str:
  """A leaf's path as its keys joined by ``/``.

  Dict keys and attribute names appear as they are, sequence entries by
  index; an NNX Variable's trailing ``.value`` is dropped, so NNX paths read
  like Linen's (``encoder/kernel``).
  """
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def _as_transform(pattern: str, rule: Rule) -> optax.GradientTransformation:
  if isinstance(rule, optax.GradientTransformation):
    return rule
  if isinstance(rule, tuple) and len(rule) == 2:
    lo, hi = rule
    _validation.check_threshold(f"rules[{pattern!r}][1]", hi)
    if not isinstance(lo, (int, float)) or lo != -hi:
      raise ValueError(
          f"`rules[{pattern!r}]` must be a symmetric range (-c, c), got"
          f" {rule!r}; for anything else give a transformation."
      )
    return _value.value(hi, count_clipped=True)
  raise TypeError(
      f"`rules[{pattern!r}]` must be an optax.GradientTransformation or a"
      f" (low, high) range, got {rule!r}."
  )


def _parse_rules(rules) -> list[tuple[str, re.Pattern, optax.GradientTransformation]]:
  """``(name, compiled pattern, transform)`` per rule, in order."""
  items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  parsed, names = [], set()
  for item in items:
    if not isinstance(item, tuple) or len(item) not in (2, 3):
      raise TypeError(
          "`rules` must be a mapping or a sequence of (pattern, transform)"
          f" or (pattern, transform, name) tuples, got item {item!r}."
      )
    pattern, rule = item[0], item[1]
    name = item[2] if len(item) == 3 else pattern
    if not isinstance(pattern, str):
      raise TypeError(f"A rule's pattern must be a str, got {pattern!r}.")
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"Rule pattern {pattern!r} is not a valid regular"
                       f" expression: {e}.") from None
    if name in names or name == _DEFAULT:
      raise ValueError(f"Rule name {name!r} is used twice (or is reserved)."
                       " Give rules distinct names.")
    names.add(name)
    parsed.append((name, compiled, _as_transform(pattern, rule)))
  if not parsed:
    raise ValueError(f"`rules` must hold at least one rule, got {rules!r}.")
  return parsed


def per_module(
    rules: Mapping[str, Rule] | Sequence[tuple],
    default: optax.GradientTransformation | None = None,
    *,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""Applies a different clipping to each group of parameters, by path.

  Each leaf's path is its keys joined by ``/``: ``params/Dense_0/kernel`` for
  Flax Linen, ``encoder/kernel`` for an NNX state (the Variable's ``.value``
  is dropped), list entries by index (``layers/0/kernel``). Each rule's
  pattern, a regular expression, is searched (`re.search`) in that path; the
  first rule that matches a leaf takes it. Leaves no rule matches go to
  `default`.

  **Each group's transformation sees only its own leaves**: a
  :func:`global_norm` inside a group clips by the norm of that group alone.
  For a global clip on top, chain one: ``optax.chain(per_module(...),
  clipkit.global_norm(1.0))``.

  Groups are assigned from the tree's structure alone, once per structure,
  and never per step; the groups are views of the one update tree (other
  groups' leaves are `optax.MaskedNode`), not copies of it.

  In :func:`optax_clipkit.metrics`, each group's stats are prefixed by the
  group's name: its pattern, or the name given as a rule's third element;
  the default group is named ``"default"``.

  Args:
    rules: A mapping from pattern to transformation, or a sequence of
      ``(pattern, transformation)`` or ``(pattern, transformation, name)``
      tuples, in order of precedence. A transformation is any
      `optax.GradientTransformation`; the range ``(-c, c)`` is short for
      ``clipkit.value(c, count_clipped=True)``.
    default: The transformation for the leaves no rule matches, e.g.
      ``optax.identity()``. If None, every leaf must match a rule.
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    An `optax.GradientTransformation` (an `optax.partition` of the groups).

  Raises:
    ValueError: At construction, for a malformed rule. At ``init``, if a
      rule matches no leaf of a non-empty tree (so a typo never passes
      silently), or if `default`
      is None and some leaves match no rule (the message lists them).

  Examples:
    Graves (2013) clipped the LSTM's derivatives to [-10, 10] and the output
    layer's to [-100, 100]:

    >>> import jax.numpy as jnp
    >>> import optax_clipkit as clipkit
    >>> params = {"lstm": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)}}
    >>> tx = clipkit.per_module({"lstm": (-10, 10), "head": (-100, 100)})
    >>> grads = {"lstm": {"kernel": jnp.array([50.0, -5.0])},
    ...          "head": {"kernel": jnp.array([500.0, 50.0])}}
    >>> out, state = tx.update(grads, tx.init(params))
    >>> out["lstm"]["kernel"], out["head"]["kernel"]
    (Array([10., -5.], dtype=float32), Array([100.,  50.], dtype=float32))
    >>> sorted(clipkit.metrics(state))[:2]
    ['head/clip_threshold', 'head/clipped_fraction']

  References:
    Graves, `Generating Sequences With Recurrent Neural Networks
    <https://arxiv.org/abs/1308.0850>`_, 2013
  """
  parsed = _parse_rules(rules)
  transforms = {name: tx for name, _, tx in parsed}
  if default is not None:
    transforms[_DEFAULT] = default
  cache: dict[Any, Any] = {}

  def labels(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if treedef in cache:
      return jax.tree.unflatten(treedef, cache[treedef])
    paths = [leaf_path(p) for p, _ in leaves]
    out, unmatched, used = [], [], set()
    for path in paths:
      name = next((n for n, pat, _ in parsed if pat.search(path)), None)
      if name is None:
        unmatched.append(path)
        name = _DEFAULT
      used.add(name)
      out.append(name)
    unused = [pat.pattern for n, pat, _ in parsed if n not in used]
    if unused and paths:  # An empty tree has nothing to mistype.
      raise ValueError(
          f"Rule pattern(s) {unused} match no leaf. The leaf paths are e.g."
          f" {paths[:_SHOWN]}."
      )
    if unmatched and default is None:
      more = len(unmatched) - _SHOWN
      raise ValueError(
          f"{len(unmatched)} leaf path(s) match no rule and `default` is"
          f" None: {unmatched[:_SHOWN]}"
          + (f" and {more} more" if more > 0 else "")
          + ". Add a rule or pass `default=optax.identity()`."
      )
    cache[treedef] = out
    return jax.tree.unflatten(treedef, out)

  return _metrics.named(optax.partition(transforms, labels), name)
