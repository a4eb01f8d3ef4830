"""Element-wise clipping to a symmetric range."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_clipkit import _metrics
from optax_clipkit import _numerics
from optax_clipkit import _tactics
from optax_clipkit import _validation


class ValueState(NamedTuple):
  """State of `value`: the metrics of the last update.

  Attributes:
    clip_threshold: The `max_value` in force.
    clipped_fraction: The fraction of elements beyond `max_value` (infinities
      count; a NaN in the updates makes it NaN), or None unless `value` was
      built with ``count_clipped=True``.
  """

  clip_threshold: jax.Array
  clipped_fraction: jax.Array | None


_metrics.register_state(ValueState, "clip_threshold", "clipped_fraction")


def clip_leaf(x: jax.Array, limit: jax.Array) -> jax.Array:
  """Clips `x` to ``[-limit, limit]``; non-finite elements become NaN.

  ``x - x`` is zero where x is finite and NaN where it is not, so subtracting
  it leaves finite results as they are (-0.0 included) and turns the clamped
  infinities into NaN; it compiles faster than a select on ``isfinite``.
  A NaN `limit` makes every element NaN.

  The arithmetic runs in at least float32 (XLA:CPU's bfloat16 arithmetic is
  much slower). Rounded back to x's dtype, the result is the same as
  clipping in that dtype to the threshold rounded to it.
  """
  ct = _numerics.compute_dtype(x.dtype)
  y = x.astype(ct)
  limit = jnp.asarray(limit).astype(ct)
  return (jax.lax.clamp(-limit, y, limit) - (y - y)).astype(x.dtype)


def _beyond(x: jax.Array, limit: jax.Array) -> jax.Array:
  """1.0 where ``|x| > limit``, else 0.0, as float32; NaN where x is NaN.

  sign(relu(|x| - limit)) is 1 exactly where |x| > limit: XLA:CPU sums it
  about 5x faster than a comparison's booleans.
  """
  excess = jnp.abs(x).astype(jnp.float32) - limit.astype(jnp.float32)
  return jnp.sign(jnp.maximum(excess, 0))


def _count(leaves, limit):
  """The number of elements beyond `limit` (apart from the clip on CPU)."""

  def portable(limit):
    return jnp.sum(_numerics.stack_scalars(
        [jnp.sum(_beyond(x, limit)) for x in leaves]))

  def cpu(limit):
    pack = _tactics.pack_small(leaves, jnp.float32)
    return jnp.sum(_tactics.per_leaf_sums(
        leaves, pack, lambda x: jnp.sum(_beyond(x, limit)),
        lambda y: _beyond(y, limit)))

  return _tactics.dispatch(lambda limit: _tactics.apart(cpu, limit), portable,
                           limit)


def clip_leaves(updates, limit, count_clipped: bool = False):
  """Applies `clip_leaf` over a tree; returns it and the clipped fraction.

  The fraction is None unless `count_clipped`. A negative or NaN `limit`
  (possible only when traced) turns every element into NaN.
  """
  leaves, treedef = jax.tree.flatten(updates)
  size = sum(x.size for x in leaves)
  limit = jnp.asarray(limit)
  limit = jnp.where(limit >= 0, limit, jnp.nan)
  if not count_clipped:
    fraction = None
  elif not size:
    fraction = jnp.zeros((), jnp.float32)
  else:
    fraction = _numerics.as_f32(_count(leaves, limit) / size)
  out = [clip_leaf(x, limit) for x in leaves]
  return jax.tree.unflatten(treedef, out), fraction


def value(
    max_value: jax.typing.ArrayLike, *, count_clipped: bool = False,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""Clips every element of the updates to ``[-max_value, max_value]``.

  .. math::
    g_j \leftarrow \max(-c, \min(c, g_j)).

  This is Keras ``clipvalue`` and ``torch.nn.utils.clip_grad_value_``. The
  result is what clipping in each leaf's own dtype, to the threshold rounded
  to that dtype, gives. Unlike `optax.clip`, NaN and infinities are never
  clipped: each comes out as NaN, so an overflowed gradient cannot come out
  as a plausible update of ``±max_value``; a negative threshold is rejected
  rather than flipping signs.

  By default the clip costs what `optax.clip` costs. ``count_clipped=True``
  adds the ``clipped_fraction`` metric, which reads the updates once more
  (on CPU, in a loop of its own; see ``docs/benchmarks.md`` for its cost).
  Under `shard_map` the clip needs nothing from other devices, and the
  fraction is that of each device's own shards.

  Args:
    max_value: The largest magnitude allowed, a non-negative number. May be
      traced (`optax.inject_hyperparams`); a negative or NaN traced value
      turns every update into NaN, so the mistake cannot pass unseen.
    count_clipped: Whether to count the clipped elements (the
      ``clipped_fraction`` metric). Structural: a bool.
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    A :class:`optax.GradientTransformation` whose state, `ValueState`, holds
    the metrics read by :func:`optax_clipkit.metrics`.

  Raises:
    ValueError: If `max_value` is negative, NaN, or not a number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_clipkit as clipkit
    >>> tx = clipkit.value(max_value=1.0, count_clipped=True)
    >>> grads = jnp.array([3.0, -0.5, -2.0, 0.25])
    >>> clipped, state = tx.update(grads, tx.init(grads))
    >>> clipped
    Array([ 1.  , -0.5 , -1.  ,  0.25], dtype=float32)
    >>> float(state.clipped_fraction)
    0.5
  """
  _validation.check_threshold("max_value", max_value)
  _validation.check_bool("count_clipped", count_clipped)

  def init_fn(params):
    _validation.check_float_leaves(params, real=True)
    return ValueState(
        clip_threshold=_numerics.as_f32(max_value),
        clipped_fraction=(
            jnp.zeros((), jnp.float32) if count_clipped else None),
    )

  def update_fn(updates, state, params=None):
    del state, params
    updates, fraction = clip_leaves(updates, max_value, count_clipped)
    return updates, ValueState(
        clip_threshold=_numerics.as_f32(max_value),
        clipped_fraction=fraction,
    )

  return _metrics.named(optax.GradientTransformation(init_fn, update_fn), name)
