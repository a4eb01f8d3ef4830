"""`clipkit.metrics`: what the last update did, read from any optax state.

States are found by type: each strategy registers its state class and the
fields that are metrics (`register_state`). Two kinds of static facts ride on
a state's *class*, so that they survive `jax.jit`, `lax.scan`, `nnx.Optimizer`
and any wrapper without being pytree leaves: the `name=` a transformation was
given (`named`) and the group labels of per-group vector metrics (`tag`). Both
make a subclass of the state's NamedTuple class, cached per value, so a named
state is still an instance of its class and reads the same.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# State class -> the names of its fields that are metrics (scalars).
_METRIC_FIELDS: dict[type, tuple[str, ...]] = {}
# State class -> the class attribute holding the labels of its vector metrics.
_LABELS: dict[type, str] = {}
# State class -> its field holding a wrapped transformation's state.
_INNER: dict[type, str] = {}
_NAME = "_clipkit_name"
# The fields through which optax's wrappers (`inject_hyperparams`,
# `MultiSteps`, `partition`, `masked`, ...) and `skip_spikes` hold inner
# states: left out of the keys, which name only what tells states apart.
_WRAPPERS = frozenset({"inner_state", "inner_states", "inner_opt_state"})


def register_state(
    cls: type, *fields: str, labels: str | None = None, inner: str | None = None
) -> type:
  """Declares `fields` of the NamedTuple `cls` as metrics read by `metrics`.

  `inner` names the field holding the state of a wrapped transformation, which
  `metrics` searches too.

  With `labels`, the fields are vectors with one entry per label, and the
  labels are the tuple of strings in the class attribute `labels` of the
  state's class (set with `tag`); each entry is reported as
  ``"<label>/<field>"``.
  """
  missing = set(fields) - set(cls._fields)  # pytype: disable=attribute-error
  if missing:
    raise AssertionError(f"{cls.__name__} has no fields {sorted(missing)}.")
  _METRIC_FIELDS[cls] = fields
  if labels is not None:
    _LABELS[cls] = labels
  if inner is not None:
    _INNER[cls] = inner
  return cls


@functools.cache
def _subclass(base: type, attrs: tuple[tuple[str, Any], ...]) -> type:

  def __reduce__(self):  # pylint: disable=invalid-name
    # Pickled as (base class, attributes, fields): the subclass itself is
    # made at run time and cannot be found by name.
    return _rebuild, (base, attrs, tuple(self))

  return type(base.__name__, (base,),
              {"__slots__": (), "_clipkit_tagged": True,
               "__reduce__": __reduce__, **dict(attrs)})


def _rebuild(base: type, attrs: tuple[tuple[str, Any], ...], fields: tuple):
  return _subclass(base, attrs)(*fields)


def _base(cls: type) -> type:
  """The class a tagged class was made from."""
  return cls.__mro__[1] if "_clipkit_tagged" in cls.__dict__ else cls


def tag(state: Any, **attrs: Any) -> Any:
  """`state`, a NamedTuple, as an instance of a subclass carrying `attrs`.

  The attributes (hashable) are static: they live in the class, hence in the
  pytree structure, never in the leaves. Attributes the state's class already
  carries are kept unless overridden.
  """
  if not (isinstance(state, tuple) and hasattr(type(state), "_fields")):
    raise TypeError(
        "Only a transformation whose state is a NamedTuple can carry a"
        f" `name`; got a state of type {type(state).__name__}."
    )
  cls = type(state)
  merged = {k: v for k, v in cls.__dict__.items()
            if k.startswith("_clipkit_") and k != "_clipkit_tagged"}
  merged.update(attrs)
  return _subclass(_base(cls), tuple(sorted(merged.items())))(*state)


def named(
    tx: optax.GradientTransformation, name: str | None
) -> optax.GradientTransformation:
  """`tx`, whose metrics are reported as ``"<name>/<metric>"`` if `name`.

  The name is stored in the class of `tx`'s state (see `tag`), so the keys do
  not depend on where `tx` sits in a chain.
  """
  if name is None:
    return tx
  if not isinstance(name, str) or not name or name.startswith("/"):
    raise ValueError(f"`name` must be a non-empty string, got {name!r}.")

  def init_fn(params):
    return tag(tx.init(params), **{_NAME: name})

  if isinstance(tx, optax.GradientTransformationExtraArgs):

    def update_fn(updates, state, params=None, **extra_args):
      updates, state = tx.update(updates, state, params, **extra_args)
      return updates, tag(state, **{_NAME: name})

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  def update_plain(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    return updates, tag(state, **{_NAME: name})

  return optax.GradientTransformation(init_fn, update_plain)


def _registered(x: Any) -> type | None:
  """The registered class `x` is an instance of (tagged or not), or None."""
  if not isinstance(x, tuple):
    return None
  base = _base(type(x))
  return base if base in _METRIC_FIELDS else None


def _name_of(x: Any) -> str | None:
  return type(x).__dict__.get(_NAME) if isinstance(x, tuple) else None


def _is_node(x: Any) -> bool:
  return _registered(x) is not None or _name_of(x) is not None


def _restored_class(x: Any) -> type | None:
  """The registered class whose fields are exactly the keys of dict `x`.

  A checkpoint restored without a target (e.g. by orbax) holds each
  NamedTuple state as a dict of its fields.
  """
  if not isinstance(x, dict) or not x:
    return None
  keys = set(x)
  for cls in _METRIC_FIELDS:
    if keys == set(cls._fields):  # pytype: disable=attribute-error
      return cls
  return None


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


def _array(v: Any) -> jax.Array:
  """A float32 array from a state field (unwrapping e.g. an NNX Variable)."""
  if not isinstance(v, (jax.Array, np.ndarray, np.generic)):
    v = v[...]  # An `nnx.Variable` under `nnx.Optimizer`: its array.
  v = jnp.asarray(v)
  return v if v.dtype == jnp.float32 else v.astype(jnp.float32)


def _fields_metrics(state: Any, cls: type, get) -> dict[str, jax.Array]:
  out = {}
  labels = getattr(type(state), _LABELS[cls], None) if cls in _LABELS else None
  for field in _METRIC_FIELDS[cls]:
    value = get(state, field)
    if value is None:  # A metric turned off.
      continue
    if cls not in _LABELS:
      out[field] = _array(value)
      continue
    value = _array(value)
    names = labels or [str(i) for i in range(value.shape[-1])]
    for i, label in enumerate(names):
      out[f"{label}/{field}"] = value[..., i]
  return out


def _find(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, Any]]:
  """``(path, node)`` for each state node in `tree`, wrapped states included."""
  found = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: _is_node(x) or _restored_class(x) is not None
  )[0]
  out = []
  for path, node in found:
    if not (_is_node(node) or _restored_class(node) is not None):
      continue
    out.append((prefix + tuple(path), node))
    cls = _registered(node) or _restored_class(node)
    field = _INNER.get(cls) if cls is not None else None
    if field is not None:
      child = node[field] if isinstance(node, dict) else getattr(node, field)
      out += _find(child, prefix + tuple(path)
                   + (jax.tree_util.GetAttrKey(field),))
  return out


def _collect(opt_state: Any) -> dict[str, jax.Array]:
  """The metrics in `opt_state`, named states under their names."""
  named_out: dict[str, jax.Array] = {}
  plain: list[tuple[tuple[str, ...], dict[str, jax.Array]]] = []
  for path, node in _find(opt_state):
    name = _name_of(node)
    cls = _registered(node)
    if name is not None:
      if cls is not None:
        inner = _fields_metrics(node, cls, getattr)
      else:  # A container (e.g. `per_module`'s state) given a name.
        inner = _collect(tuple(node))
      for key, value in inner.items():
        if f"{name}/{key}" in named_out:
          raise ValueError(
              f"Two clipkit transformations are named {name!r}; give each a"
              " distinct `name`."
          )
        named_out[f"{name}/{key}"] = value
      continue
    if cls is not None:
      m = _fields_metrics(node, cls, getattr)
    else:
      cls = _restored_class(node)
      m = _fields_metrics(node, cls, lambda d, f: d[f])
    if m:
      plain.append((tuple(n for n in map(_key_name, path)
                          if n not in _WRAPPERS), m))
  out = {}
  if plain:
    paths = [p for p, _ in plain]
    # A state at the root of `opt_state` (one that wraps the others, such
    # as `skip_spikes`') keeps plain keys.
    prefixes = ([""] if len(plain) == 1
                else [n + "/" if n else "" for n in _prefixes(paths)])
    for prefix, (_, m) in zip(prefixes, plain):
      out.update({prefix + k: v for k, v in m.items()})
  clash = set(out) & set(named_out)
  if clash:
    raise ValueError(
        f"Metric keys {sorted(clash)} are both a named transformation's and"
        " an unnamed one's; rename one."
    )
  out.update(named_out)
  return out


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
  update every metric holds its initial value (zero; 1.0 for
  ``clip_scale``; the threshold for the fixed clippers and for `zclip` with
  `max_norm`; inf for `adaptive`'s ``clip_threshold``).

  With one clipkit state the keys are plain (``metrics(s)["grad_norm"]``).
  With several, each key is prefixed by the part of the state's path in
  `opt_state` that tells them apart, joined with ``/``: in
  ``optax.chain(clipkit.value(1.0), clipkit.global_norm(1.0), optax.sgd(0.1))``
  the keys are ``"0/clip_threshold"``, ``"1/grad_norm"`` and so on; in
  `per_module`, the group names (``"head/grad_norm"``). The fields through
  which wrappers hold inner states (``inner_state``, ...) are left out, and
  a state that wraps the others, such as `skip_spikes`', keeps plain keys.
  A state holding no clipkit transformation gives an empty dict.

  **Stable keys.** A transformation given ``name=`` reports
  ``"<name>/<key>"`` wherever it sits: editing the rest of the chain does
  not change its keys. Two with the same name raise a ValueError.

  Values are float32 arrays, also under `nnx.Optimizer` (never NNX
  Variables). A state restored without a target (e.g. by orbax, as dicts)
  is read by its field names; names and `monitor` groups, which are not
  saved, are then lost. The full schema is in ``docs/metrics.md``.

  Args:
    opt_state: The state of an optax transformation, e.g. from
      ``tx.init(params)`` or ``tx.update(...)``.

  Returns:
    A dict mapping metric names to float32 scalars.

  Raises:
    ValueError: If two transformations in `opt_state` share a name.

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
  return _collect(opt_state)
