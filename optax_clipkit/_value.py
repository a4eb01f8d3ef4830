"""Element-wise clipping to a symmetric range."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_clipkit import _metrics
from optax_clipkit import _numerics
from optax_clipkit import _validation


class ValueState(NamedTuple):
  """State of `value`: the metrics of the last update.

  Attributes:
    clip_threshold: The `max_value` in force.
    clipped_fraction: The fraction of elements beyond `max_value` (infinities
      count; a NaN in the updates makes it NaN), or None if `value` was built
      with ``count_clipped=False``.
  """

  clip_threshold: jax.Array
  clipped_fraction: jax.Array | None


_metrics.register_state(ValueState, "clip_threshold", "clipped_fraction")


def clip_leaf(x: jax.Array, limit: jax.Array) -> jax.Array:
  """Clips `x` to ``[-limit, limit]``; non-finite elements become NaN.

  ``x - x`` is zero where x is finite and NaN where it is not, so subtracting
  it leaves finite results as they are (-0.0 included) and turns the clamped
  infinities into NaN. Two elementwise operations beyond the clamp: a step
  on 1,000 leaves compiles in about 1.1x the time of `optax.clip`'s, where a
  select on ``isfinite`` took 1.35x.

  The arithmetic runs in at least float32 (XLA:CPU's bfloat16 arithmetic is
  much slower). Rounded back to x's dtype, the result is the same as
  clipping in that dtype to the threshold rounded to it.
  """
  ct = _numerics.compute_dtype(x.dtype)
  y = x.astype(ct)
  limit = jnp.asarray(limit).astype(ct)
  return (jax.lax.clamp(-limit, y, limit) - (y - y)).astype(x.dtype)


def _count_beyond(x: jax.Array, limit: jax.Array) -> jax.Array:
  """The number of elements with ``|x| > limit``, as a float32.

  Infinities count; a NaN makes it NaN. sign(relu(|x| - limit)) is 1 exactly
  where |x| > limit: XLA:CPU sums it about 5x faster than a comparison's
  booleans.
  """
  excess = jnp.abs(x).astype(jnp.float32) - limit.astype(jnp.float32)
  return jnp.sum(jnp.sign(jnp.maximum(excess, 0)))


def _count_apart(leaves, limit):
  """Sum of `_count_beyond` over `leaves`, in a loop nest of its own on CPU.

  Small leaves are counted in one pack where `_numerics.pack_small` allows.

  Fused into the loop that clips (and, in a training step, applies) the
  updates, the count makes XLA:CPU's multi-output loop several times slower
  than the two loops apart; a conditional on a value it cannot fold keeps
  them apart. Other backends fuse it well and get the plain sum.
  """

  def total(limit):
    pack = _numerics.pack_small(leaves, jnp.float32)
    counts = [_count_beyond(leaves[i], limit)
              for i in _numerics.unpacked(leaves, pack)]
    if pack:
      counts.append(_count_beyond(pack.data, limit))
    return jnp.sum(_numerics.stack_scalars(counts))

  def apart(limit):
    limit = jax.lax.optimization_barrier(limit)
    return jax.lax.cond(
        limit >= 0, total, lambda _: jnp.zeros((), jnp.float32), limit
    )

  return jax.lax.platform_dependent(limit, cpu=apart, default=total)


def clip_leaves(updates, limit, count_clipped: bool = True):
  """Applies `clip_leaf` over a tree; returns it and the clipped fraction.

  The fraction is None unless `count_clipped`.
  """
  leaves, treedef = jax.tree.flatten(updates)
  size = sum(x.size for x in leaves)
  limit = jnp.asarray(limit)
  if not count_clipped:
    fraction = None
  elif not size:
    fraction = jnp.zeros((), jnp.float32)
  else:
    fraction = _numerics.as_f32(_count_apart(leaves, limit) / size)
  out = [clip_leaf(x, limit) for x in leaves]
  return jax.tree.unflatten(treedef, out), fraction


def value(
    max_value: jax.typing.ArrayLike, *, count_clipped: bool = True,
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

  Counting the clipped elements for the ``clipped_fraction`` metric reads
  the updates once more. Where the count cannot share a loop with the clip
  and the optimizer (on CPU), that costs about a fifth of an Adam step;
  ``count_clipped=False`` drops the count and the metric, and the clip then
  costs what `optax.clip` costs.

  Args:
    max_value: The largest magnitude allowed, a non-negative number. May be
      traced (`optax.inject_hyperparams`); a negative traced value acts as
      zero.
    count_clipped: Whether to count the clipped elements (the
      ``clipped_fraction`` metric).
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    A :class:`optax.GradientTransformation` whose state, `ValueState`, holds
    the metrics read by :func:`optax_clipkit.metrics`.

  Raises:
    ValueError: If `max_value` is negative, NaN, or not a number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_clipkit as clipkit
    >>> tx = clipkit.value(max_value=1.0)
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
    limit = jnp.maximum(jnp.asarray(max_value), 0)
    updates, fraction = clip_leaves(updates, limit, count_clipped)
    return updates, ValueState(
        clip_threshold=_numerics.as_f32(max_value),
        clipped_fraction=fraction,
    )

  return _metrics.named(optax.GradientTransformation(init_fn, update_fn), name)
