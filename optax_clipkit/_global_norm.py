"""Clipping by the global L2 norm of the whole update tree."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_clipkit import _metrics
from optax_clipkit import _numerics
from optax_clipkit import _validation


class GlobalNormState(NamedTuple):
  """State of `global_norm`: the metrics of the last update.

  Attributes:
    grad_norm: L2 norm of the incoming updates (float32).
    clip_threshold: The `max_norm` in force.
    clip_scale: The factor the updates were multiplied by (1.0 if unclipped).
  """

  grad_norm: jax.Array
  clip_threshold: jax.Array
  clip_scale: jax.Array


_metrics.register_state(
    GlobalNormState, "grad_norm", "clip_threshold", "clip_scale"
)


def init_norm_metrics(threshold: jax.typing.ArrayLike = 0.0):
  """Initial ``(grad_norm, clip_threshold, clip_scale)``: float32 scalars."""
  return (
      jnp.zeros((), jnp.float32),
      _numerics.as_f32(threshold),
      jnp.ones((), jnp.float32),
  )


def clip_global(updates, threshold, norm: _numerics.Norm | None = None,
                axis_name=None):
  """Scales `updates` so that their global norm is at most `threshold`.

  Returns ``(clipped_updates, norm, scale)``. The norm is computed unless
  given. This is the one implementation every global-norm strategy uses.
  """
  leaves, treedef = jax.tree.flatten(updates)
  if norm is None:
    norm, scale = _numerics.clip_norms(leaves, threshold, axis_name)
  else:
    scale = _numerics.clip_to(norm, threshold)
  out = _numerics.scale_leaves(leaves, scale)
  return jax.tree.unflatten(treedef, out), norm, scale


def global_norm(
    max_norm: jax.typing.ArrayLike,
    *,
    axis_name: _numerics.AxisName = None,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""Clips updates to a maximum global L2 norm.

  With :math:`g` the updates (all leaves together) and :math:`c` the
  threshold `max_norm`,

  .. math::
    g \leftarrow g \cdot \min\left(1, \frac{c}{\|g\|_2}\right).

  Below the threshold the updates come back unchanged, bit for bit. On
  ordinary inputs this equals `optax.clip_by_global_norm`,
  ``torch.nn.utils.clip_grad_norm_`` and Keras ``global_clipnorm``.

  Unlike those, the norm is accumulated in float32 (never in a float16 or
  bfloat16 leaf's own dtype) and is overflow-safe: any finite updates, however
  large (float16 gradients of 100 over 1,000 elements; float32 gradients of
  1e20), are scaled to `max_norm` in their own direction, never to zero or
  NaN. Output dtypes equal input dtypes leaf by leaf. A norm whose square is
  below float32's normal range (under about 1e-19) reads as 0. The update
  has no control flow on data: no device-to-host sync on GPU or TPU.

  If the updates contain a NaN or an infinity, the norm is NaN or inf and the
  updates pass through unchanged, so the non-finite values stay visible to
  `optax.apply_if_finite` and to your own checks; they never come out as a
  plausible finite update.

  Inside `jax.jit` with sharded inputs (GSPMD), the norm is global and costs
  only scalar all-reduces. Inside `shard_map` or `pmap`, where each device
  sees only its shard of each leaf, the norm is *local* unless `axis_name`
  names the mapped axes: then the squared norms are `psum`'d over them.

  Args:
    max_norm: The maximum global norm, a non-negative number (``inf`` turns
      clipping off; 0 zeroes the updates). May be traced
      (`optax.inject_hyperparams`); a negative or NaN traced value turns the
      updates into NaN, so the mistake cannot pass unseen.
    axis_name: Mapped axis name (or tuple of names) over which to sum the
      squared norm under `shard_map`/`pmap`. None for a local norm.
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    A :class:`optax.GradientTransformation` whose state, `GlobalNormState`,
    holds the metrics read by :func:`optax_clipkit.metrics`.

  Raises:
    ValueError: If `max_norm` is negative, NaN, or not a number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_clipkit as clipkit
    >>> tx = clipkit.global_norm(max_norm=1.0)
    >>> grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    >>> clipped, state = tx.update(grads, tx.init(grads))
    >>> clipped["a"], clipped["b"]
    (Array([0.6], dtype=float32), Array([0.8], dtype=float32))
    >>> float(state.grad_norm)
    5.0

  References:
    Pascanu et al., `On the difficulty of training Recurrent Neural Networks
    <https://arxiv.org/abs/1211.5063>`_, 2013
  """
  _validation.check_threshold("max_norm", max_norm)

  def init_fn(params):
    _validation.check_float_leaves(params)
    return GlobalNormState(*init_norm_metrics(max_norm))

  def update_fn(updates, state, params=None):
    del state, params
    updates, norm, scale = clip_global(updates, max_norm, axis_name=axis_name)
    return updates, GlobalNormState(
        grad_norm=_numerics.as_f32(norm.value),
        clip_threshold=_numerics.as_f32(max_norm),
        clip_scale=_numerics.as_f32(scale.applied),
    )

  return _metrics.named(optax.GradientTransformation(init_fn, update_fn), name)
