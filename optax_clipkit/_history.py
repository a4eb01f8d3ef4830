"""Shared machinery of the adaptive strategies: norm statistics kept in state.

Every adaptive strategy computes the global norm of the updates, derives a
threshold from statistics of past norms, clips to it, and records the norm in
its statistics. The statistics are updated only by finite norms: a step whose
norm is NaN or inf leaves them exactly as they were.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from optax_clipkit import _global_norm
from optax_clipkit import _numerics


def push(buffer: jax.Array, count: jax.Array, value: jax.Array):
  """Writes `value` into the ring `buffer` after `count` earlier writes.

  Returns ``(buffer, count)``. The slot written is ``count % size``, so the
  buffer holds the last ``min(count, size)`` values. `count` is kept below
  ``2 * size`` without changing its residue, so it never overflows.
  """
  size = buffer.shape[0]
  # `jnp.asarray`: a state restored from a checkpoint may hold numpy arrays.
  buffer = jnp.asarray(buffer)
  buffer = buffer.at[count % size].set(value.astype(buffer.dtype))
  count = count + 1
  return buffer, jnp.where(count >= 2 * size, count - size, count)


def filled(buffer: jax.Array, count: jax.Array) -> jax.Array:
  """How many slots of a ring `buffer` hold values after `count` writes."""
  return jnp.minimum(count, buffer.shape[0])


def percentile_of(values: jax.Array, count: jax.Array, q: jax.typing.ArrayLike):
  """The `q`-th percentile of ``values[:count]``, numpy's linear method.

  Entries from `count` on are ignored. Returns inf if `count` is 0.
  """
  size = values.shape[0]
  valid = jnp.arange(size) < count
  ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
  n = jnp.maximum(count, 1)
  q = jnp.clip(jnp.asarray(q).astype(values.dtype), 0, 100)
  rank = q / 100 * (n - 1).astype(values.dtype)
  lo = jnp.floor(rank).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, n - 1)
  t = rank - lo.astype(values.dtype)
  a, b = ordered[lo], ordered[hi]
  diff = b - a
  # numpy's `_lerp`: the two forms agree at t = 0.5 and are exact at 0 and 1.
  out = jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t)
  return jnp.where(count > 0, out, jnp.inf)


def keep_if_finite(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `ok`, else `old`, leaf by leaf (a bad step changes nothing)."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def ceiling(threshold: jax.Array, max_norm) -> jax.Array:
  """``min(threshold, max_norm)``, or `threshold` when `max_norm` is None."""
  if max_norm is None:
    return threshold
  return jnp.minimum(threshold, _numerics.as_f32(max_norm))


def adaptive_clip(
    updates: Any,
    stats: Any,
    rule: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]],
    *,
    max_norm=None,
    axis_name: _numerics.AxisName = None,
):
  """Clips `updates` to a threshold computed from their norm and `stats`.

  ``rule(norm, ok, stats) -> (threshold, new_stats)`` sees the float32 global
  norm of `updates` (zero where it is not finite) and ``ok``, whether it is
  finite. Its `new_stats` are kept only if the norm is finite; its threshold
  must not depend on a norm that is not. `max_norm`, if given, caps the
  threshold.

  Returns ``(updates, stats, (grad_norm, threshold, scale))`` where the last
  triple holds the metrics shared by every norm-based strategy.
  """
  leaves = jax.tree.leaves(updates)
  norm = _numerics.global_norm(leaves, axis_name)
  value = _numerics.as_f32(norm.value)
  ok = jnp.isfinite(value)
  threshold, new_stats = rule(jnp.where(ok, value, 0.0), ok, stats)
  threshold = ceiling(threshold, max_norm)
  updates, _, scale = _global_norm.clip_global(updates, threshold, norm)
  metrics = (value, _numerics.as_f32(threshold), _numerics.as_f32(scale.applied))
  return updates, keep_if_finite(ok, new_stats, stats), metrics


def percentile_clip(
    updates: Any,
    history: tuple[jax.Array, jax.Array, jax.Array],
    percentile: jax.typing.ArrayLike,
    *,
    growth: jax.typing.ArrayLike | None = None,
    scale: jax.typing.ArrayLike = 1.0,
    max_norm=None,
    axis_name: _numerics.AxisName = None,
):
  """One step of percentile clipping over a ring buffer of past norms.

  `history` is ``(buffer, count, level)``: the ring buffer, its write count
  and the last `percentile` of it (inf before the first). Each finite norm is
  written to the buffer, capped at ``(1 + growth) * level`` unless `growth` is
  None; the new level is the `percentile` of the buffer, and the threshold is
  ``scale * level``, capped at `max_norm`.

  Returns ``(updates, history, (grad_norm, threshold, clip_scale))``.
  """

  def rule(norm, ok, stats):
    buffer, count, level = stats
    if growth is not None:
      norm = jnp.minimum(norm, level * (1 + _numerics.as_f32(growth)))
    pushed = push(buffer, count, norm)
    buffer, count = keep_if_finite(ok, pushed, (buffer, count))
    level = percentile_of(buffer, filled(buffer, count), percentile)
    return _numerics.as_f32(scale) * level, (*pushed, level)

  return adaptive_clip(
      updates, history, rule, max_norm=max_norm, axis_name=axis_name
  )
