"""Clipping each leaf by its own L2 norm."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_clipkit import _global_norm
from optax_clipkit import _metrics
from optax_clipkit import _numerics
from optax_clipkit import _validation


class PerLeafNormState(NamedTuple):
  """State of `per_leaf_norm`: the metrics of the last update.

  Attributes:
    grad_norm: Global L2 norm of the incoming updates (float32).
    clip_threshold: The `max_norm` in force.
    clip_scale: The smallest factor any leaf was multiplied by.
    clipped_fraction: The fraction of leaves that were clipped.
  """

  grad_norm: jax.Array
  clip_threshold: jax.Array
  clip_scale: jax.Array
  clipped_fraction: jax.Array


_metrics.register_state(
    PerLeafNormState,
    "grad_norm",
    "clip_threshold",
    "clip_scale",
    "clipped_fraction",
)


def per_leaf_norm(
    max_norm: jax.typing.ArrayLike,
    *,
    axis_name: _numerics.AxisName = None,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""Clips each leaf of the updates to a maximum L2 norm of its own.

  For every leaf :math:`g_i`, with :math:`c` the threshold `max_norm`,

  .. math::
    g_i \leftarrow g_i \cdot \min\left(1, \frac{c}{\|g_i\|_2}\right).

  This is what Keras ``clipnorm`` does (per variable). Leaves below the
  threshold come back unchanged, bit for bit. Norms accumulate in float32 and
  are overflow-safe, as in :func:`global_norm`. A leaf containing a NaN or an
  infinity passes through unchanged. As for :func:`global_norm`, a norm
  whose square is below float32's normal range (under about 1e-19) reads as
  0: a threshold of 0 zeroes it, a positive one leaves it unchanged.

  Args:
    max_norm: The maximum norm of each leaf, a non-negative number. May be
      traced (`optax.inject_hyperparams`); a negative or NaN traced value
      turns the updates into NaN.
    axis_name: Mapped axis name (or tuple of names) over which to sum the
      squared norms under `shard_map`/`pmap`. None for local norms.
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    A :class:`optax.GradientTransformation` whose state, `PerLeafNormState`,
    holds the metrics read by :func:`optax_clipkit.metrics`.

  Raises:
    ValueError: If `max_norm` is negative, NaN, or not a number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_clipkit as clipkit
    >>> tx = clipkit.per_leaf_norm(max_norm=1.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> clipped, state = tx.update(grads, tx.init(grads))
    >>> clipped["a"], clipped["b"]
    (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))
    >>> float(state.clipped_fraction)
    0.5
  """
  _validation.check_threshold("max_norm", max_norm)

  def init_fn(params):
    _validation.check_float_leaves(params)
    return PerLeafNormState(
        *_global_norm.init_norm_metrics(max_norm),
        clipped_fraction=jnp.zeros((), jnp.float32),
    )

  def update_fn(updates, state, params=None):
    del state, params
    leaves, treedef = jax.tree.flatten(updates)
    norms, scale = _numerics.clip_norms(leaves, max_norm, axis_name, True)
    out = _numerics.scale_leaves(leaves, scale)
    new_state = PerLeafNormState(
        grad_norm=_numerics.as_f32(_numerics.total_norm(norms).value),
        clip_threshold=_numerics.as_f32(max_norm),
        clip_scale=_numerics.as_f32(
            jnp.min(scale.applied) if leaves else 1.0
        ),
        clipped_fraction=_numerics.as_f32(
            jnp.mean(scale.clipped) if leaves else 0.0
        ),
    )
    return jax.tree.unflatten(treedef, out), new_state

  return _metrics.named(optax.GradientTransformation(init_fn, update_fn), name)
