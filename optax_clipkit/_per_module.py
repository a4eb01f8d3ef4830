"""Per-module rules: a clipping transformation per group of parameters."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Union

import jax
import optax

from optax_clipkit import _metrics
from optax_clipkit import _validation
from optax_clipkit import _value

Rule = Union[optax.GradientTransformation, tuple[float, float]]
Key = Union[str, type]  # A pattern, or a module class found in `model`.
_DEFAULT = "default"


class _Rule(NamedTuple):
  name: str  # The group's name in the metrics.
  pattern: re.Pattern
  tx: optax.GradientTransformation
  key: str  # The rule's key as the user gave it (a class by its name).
  by_class: bool
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


def compile_pattern(pattern: str, what: str) -> re.Pattern:
  """`pattern` compiled; a ValueError naming `what` (a rule, a group) if bad."""
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} pattern {pattern!r} is not a valid regular"
                     f" expression: {e}.") from None


def _as_transform(pattern: str, rule: Rule) -> optax.GradientTransformation:
  if isinstance(rule, optax.GradientTransformation):
    return rule
  if isinstance(rule, tuple) and len(rule) == 2:
    lo, hi = rule
    _validation.check_threshold(f"rules[{pattern!r}][1]", hi)
    # Concrete numbers (None where traced), numpy and jax scalars included.
    low, high = (_validation.concrete_float(f"rules[{pattern!r}][{i}]", v,
                                            "a number")
                 for i, v in enumerate(rule))
    if low is None or high is None or low != -high:
      raise ValueError(
          f"`rules[{pattern!r}]` must be a symmetric range (-c, c), got"
          f" {rule!r}; for anything else give a transformation."
      )
    return _value.value(hi, count_clipped=True)
  raise TypeError(
      f"`rules[{pattern!r}]` must be an optax.GradientTransformation or a"
      f" (low, high) range, got {rule!r}."
  )


def _submodules(model) -> list[tuple[str, Any]]:
  """``(path, module)`` for every module in an NNX `model`, root included."""
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    nnx = None
  if nnx is None or not isinstance(model, nnx.Module):
    raise TypeError(
        "`model` must be a Flax NNX Module, whose submodules a rule's class"
        f" is looked up in, got {type(model).__name__}. In Linen, the class"
        " name is part of the path: give it as a pattern, e.g."
        " 'OptimizedLSTMCell'."
    )
  return [("/".join(map(str, path)), node)
          for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module)]


def _class_pattern(cls: type, model) -> str:
  """A pattern matching the leaves of every instance of `cls` in `model`."""
  if model is None:
    raise TypeError(
        f"A rule keyed by the class {cls.__name__} needs the model to find"
        f" its instances in: per_module({{{cls.__name__}: ...}},"
        " model=model)."
    )
  modules = _submodules(model)
  paths = sorted(p for p, m in modules if isinstance(m, cls))
  if not paths:
    found = sorted({type(m).__name__ for _, m in modules})
    raise ValueError(
        f"Rule class {cls.__name__} has no instance in `model`; its modules"
        f" are of the classes {found}."
    )
  if "" in paths:  # The model itself: every leaf.
    return ""
  return "^(?:" + "|".join(map(re.escape, paths)) + ")(?:/|$)"


_RULES_ARE = ("a mapping or a sequence of (pattern, transform) or (pattern,"
              " transform, name) tuples")


def _parse_rules(rules, model) -> list[_Rule]:
  """The rules, in order."""
  items = _validation.entries("rules", rules, _RULES_ARE)
  parsed, names = [], set()
  for item in items:
    if not isinstance(item, tuple) or len(item) not in (2, 3):
      raise TypeError(f"`rules` must be {_RULES_ARE}, got item {item!r}.")
    key, rule = item[0], item[1]
    if isinstance(key, type):
      pattern, default_name = _class_pattern(key, model), key.__name__
    elif isinstance(key, str):
      pattern = default_name = key
    else:
      raise TypeError("A rule's key must be a pattern (str) or a module"
                      f" class, got {key!r}.")
    name = item[2] if len(item) == 3 else default_name
    compiled = compile_pattern(pattern, "Rule")
    if name in names or name == _DEFAULT:
      raise ValueError(f"Rule name {name!r} is used twice (or is reserved)."
                       " Give rules distinct names.")
    names.add(name)
    parsed.append(_Rule(name, compiled, _as_transform(default_name, rule),
                        default_name, isinstance(key, type)))
  if not parsed:
    raise ValueError(f"`rules` must hold at least one rule, got {rules!r}.")
  return parsed


def _no_match_message(unused: list[_Rule], paths: list[str]) -> str:
  """The error for rules that match no leaf, with the likely fix."""
  msg = (f"Rule pattern(s) {[r.key for r in unused]} match no leaf. The leaf"
         f" paths are e.g. {paths[:_SHOWN]}.")
  by_class = [r.key for r in unused if r.by_class]
  if by_class:
    msg += (f" {by_class[0]} has no leaf here, or an earlier rule took them"
            " all: put the rule for an enclosing module before the rules for"
            " the modules it contains.")
  classes = [r.key for r in unused
             if not r.by_class and re.fullmatch(r"[A-Z]\w*", r.key)]
  if classes:
    msg += (
        f" A class name such as {classes[0]!r} appears only in Linen's"
        " automatic names (params/Dense_0/kernel); NNX paths are made of"
        " attribute names. Match those, or give the class and the model:"
        f" per_module({{nnx.{classes[0]}: ...}}, model=model)."
    )
  return msg


def per_module(
    rules: Mapping[Key, Rule] | Sequence[tuple],
    default: optax.GradientTransformation | None = None,
    *,
    model: Any = None,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""Applies a different clipping to each group of parameters, by path.

  Each leaf's path is its keys joined by ``/``: ``params/Dense_0/kernel`` for
  Flax Linen, ``head/kernel`` for an NNX state (the Variable's ``.value`` is
  dropped), list entries by index (``layers/0/kernel``). A rule's key is
  either a pattern, a regular expression searched (`re.search`) in that
  path, or a module class: the rule then takes the leaves of every instance
  of that class in `model` (an NNX Module). The first rule that matches a
  leaf takes it; leaves no rule matches go to `default`.

  Linen paths hold class names (``OptimizedLSTMCell_0``), NNX paths hold
  attribute names (``lstm/cell/dense_i/kernel``): in NNX, match attribute
  names or key the rule by the class. A module may contain others (an NNX
  LSTM cell holds ``nnx.Linear`` layers), so put the enclosing module's rule
  first.

  **Each group's transformation sees only its own leaves**: a
  :func:`global_norm` inside a group clips by the norm of that group alone.
  For a global clip on top, chain one: ``optax.chain(per_module(...),
  clipkit.global_norm(1.0))``.

  Element-wise ranges such as ``(-10, 10)`` bind or not depending on the
  scale of the loss: the gradient of a loss summed over ``n`` terms is ``n``
  times that of their mean, so ranges meant for a summed loss are divided
  by ``n`` for the mean.

  Groups are assigned from the tree's structure alone, once per structure,
  and never per step; the groups are views of the one update tree (other
  groups' leaves are `optax.MaskedNode`), not copies of it.

  In :func:`optax_clipkit.metrics`, where several groups hold clipkit
  transformations, each group's stats are prefixed by the group's name: its
  pattern or class name, or the name given as a rule's third element; the
  default group is named ``"default"``. As everywhere, the keys of a lone
  clipkit state are plain, and a transformation given ``name=`` keeps it.

  Args:
    rules: A mapping from key to transformation, or a sequence of
      ``(key, transformation)`` or ``(key, transformation, name)`` tuples, in
      order of precedence. A key is a pattern (str) or a module class. A
      transformation is any `optax.GradientTransformation`; the range
      ``(-c, c)`` is short for ``clipkit.value(c, count_clipped=True)``.
    default: The transformation for the leaves no rule matches, e.g.
      ``optax.identity()``. If None, every leaf must match a rule.
    model: The Flax NNX Module whose submodules a class key is looked up in;
      needed only for class keys.
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    An `optax.GradientTransformation` (an `optax.partition` of the groups).

  Raises:
    ValueError: At construction, for a malformed rule or a class with no
      instance in `model`. At ``init``, if a rule matches no leaf of a
      non-empty tree (so a typo never passes silently), or if `default` is
      None and some leaves match no rule (the message lists them).
    TypeError: At construction, for a class key without an NNX `model`.

  Examples:
    Graves (2013) clipped the LSTM's derivatives to [-10, 10] and the output
    layer's to [-100, 100]. In Linen, the class names are in the paths; the
    embedding matches neither rule and goes to `default`:

    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_clipkit as clipkit
    >>> class CharLSTM(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     h = nn.RNN(nn.OptimizedLSTMCell(8))(nn.Embed(30, 8)(x))
    ...     return nn.Dense(30)(h)
    >>> x = jnp.zeros((1, 5), jnp.int32)
    >>> params = CharLSTM().init(jax.random.key(0), x)
    >>> tx = clipkit.per_module(
    ...     {"OptimizedLSTMCell": (-10, 10), "Dense": (-100, 100)},
    ...     default=optax.identity())
    >>> grads = jax.tree.map(lambda p: jnp.full_like(p, 50.0), params)
    >>> out, state = tx.update(grads, tx.init(params))
    >>> out["params"]["OptimizedLSTMCell_0"]["ii"]["kernel"][0, 0]
    Array(10., dtype=float32)
    >>> out["params"]["Dense_0"]["bias"][0], out["params"]["Embed_0"]["embedding"][0, 0]
    (Array(50., dtype=float32), Array(50., dtype=float32))
    >>> sorted(clipkit.metrics(state))
    ['Dense/clip_threshold', 'Dense/clipped_fraction', 'OptimizedLSTMCell/clip_threshold', 'OptimizedLSTMCell/clipped_fraction']

    The same model in NNX, its rules keyed by class:

    >>> from flax import nnx
    >>> class CharLSTM(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.embed = nnx.Embed(30, 8, rngs=rngs)
    ...     self.lstm = nnx.RNN(nnx.OptimizedLSTMCell(8, 8, rngs=rngs))
    ...     self.head = nnx.Linear(8, 30, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(self.lstm(self.embed(x)))
    >>> model = CharLSTM(nnx.Rngs(0))
    >>> tx = clipkit.per_module(
    ...     {nnx.OptimizedLSTMCell: (-10, 10), nnx.Linear: (-100, 100)},
    ...     default=optax.identity(), model=model)
    >>> optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(0.1)),
    ...                           wrt=nnx.Param)

    or by attribute path: ``{"lstm": (-10, 10), "head": (-100, 100)}``.

  References:
    Graves, `Generating Sequences With Recurrent Neural Networks
    <https://arxiv.org/abs/1308.0850>`_, 2013
  """
  parsed = _parse_rules(rules, model)
  transforms = {r.name: r.tx for r in parsed}
  if default is not None:
    if not isinstance(default, optax.GradientTransformation):
      raise TypeError(
          "`default` must be an optax.GradientTransformation or None, got"
          f" {default!r}" + (" (call it: `optax.identity()`, not"
                             " `optax.identity`)" if callable(default)
                             else "") + ".")
    transforms[_DEFAULT] = default
  cache: dict[Any, Any] = {}

  def labels(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if treedef in cache:
      return jax.tree.unflatten(treedef, cache[treedef])
    paths = [leaf_path(p) for p, _ in leaves]
    out, unmatched, used = [], [], set()
    for path in paths:
      name = next((r.name for r in parsed if r.pattern.search(path)), None)
      if name is None:
        unmatched.append(path)
        name = _DEFAULT
      used.add(name)
      out.append(name)
    unused = [r for r in parsed if r.name not in used]
    if unused and paths:  # An empty tree has nothing to mistype.
      raise ValueError(_no_match_message(unused, paths))
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
