"""AutoClip: clipping to a percentile of the history of gradient norms."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_clipkit import _global_norm
from optax_clipkit import _history
from optax_clipkit import _metrics
from optax_clipkit import _numerics
from optax_clipkit import _validation


class AutoClipState(NamedTuple):
  """State of `autoclip`.

  Attributes:
    grad_norm: Global L2 norm of the last incoming updates (float32).
    clip_threshold: The threshold of the last update.
    clip_scale: The factor the last updates were multiplied by.
    norm_history: Ring buffer of the last `history` finite norms (float32).
    norm_count: int32 count of finite norms written to `norm_history`, kept
      below ``2 * history`` (the buffer is full from ``history`` on).
  """

  grad_norm: jax.Array
  clip_threshold: jax.Array
  clip_scale: jax.Array
  norm_history: jax.Array
  norm_count: jax.Array


_metrics.register_state(
    AutoClipState, "grad_norm", "clip_threshold", "clip_scale"
)


def autoclip(
    percentile: jax.typing.ArrayLike = 10.0,
    history: int = 1000,
    *,
    max_norm: jax.typing.ArrayLike | None = None,
    axis_name: _numerics.AxisName = None,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""AutoClip: clips the global norm to a percentile of past norms.

  At each step, with :math:`n_t` the global L2 norm of the updates and
  :math:`H_t` the last `history` finite norms *including* :math:`n_t`,

  .. math::
    c_t = \operatorname{percentile}(H_t, p), \qquad
    g \leftarrow g \cdot \min\left(1, \frac{c_t}{n_t}\right),

  with the percentile linearly interpolated as by ``numpy.percentile``'s
  default. If `max_norm` is given, :math:`\min(c_t, \text{max_norm})` is used
  instead. This is Algorithm 1 of the paper exactly, with the full history
  whenever `history` is at least the number of steps. In particular step 1 is
  never clipped (its only history is its own norm) unless `max_norm` applies.

  The PyPI package ``autoclip`` differs from the paper: it leaves the current
  norm out of the history, its default quantile 0.9 is the 90th percentile
  rather than the 10th, and it clips per parameter by default. This follows
  the paper.

  A step whose norm is NaN or inf leaves the history and its count exactly as
  they were, so one bad batch never poisons later thresholds; its updates pass
  through unchanged (they stay non-finite, as in :func:`global_norm`). The
  metrics in the state still report that step.

  As in the paper, a zero norm (a batch masked out, or a norm below about
  1e-19, whose squares flush to 0) enters the history: while at least
  :math:`p` percent of the history is zero, the threshold is 0, and every
  update is zeroed. :func:`adaptive` reads a zero norm as no news.

  Args:
    percentile: The percentile :math:`p` in [0, 100] of the norm history to
      clip to. May be traced (`optax.inject_hyperparams`).
    history: Structural: how many past finite norms to keep (an int >= 1; it
      fixes the shape of the state).
    max_norm: Optional absolute ceiling on the threshold, a non-negative
      number.
    axis_name: Mapped axis name(s) over which the norm is global under
      `shard_map`/`pmap`; see :func:`global_norm`.
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    A :class:`optax.GradientTransformation` with state `AutoClipState`.

  Raises:
    ValueError: If `percentile` is outside [0, 100], `history` < 1 or
      `max_norm` is negative.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_clipkit as clipkit
    >>> tx = clipkit.autoclip(percentile=50.0)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in (1.0, 3.0, 9.0):
    ...   out, state = tx.update({"w": jnp.array([g])}, state)
    >>> float(out["w"][0])  # the median of 1, 3 and 9
    3.0

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
  """
  _validation.check_percentile("percentile", percentile)
  size = _validation.check_int("history", history, low=1)
  _validation.check_optional_threshold("max_norm", max_norm)

  def init_fn(params):
    _validation.check_float_leaves(params)
    return AutoClipState(
        *_global_norm.init_norm_metrics(),
        norm_history=jnp.zeros((size,), jnp.float32),
        norm_count=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None):
    del params
    history = (state.norm_history, state.norm_count, jnp.float32(jnp.inf))
    updates, (buffer, count, _), metrics = _history.percentile_clip(
        updates, history, percentile, max_norm=max_norm, axis_name=axis_name
    )
    return updates, AutoClipState(*metrics, buffer, count)

  return _metrics.named(optax.GradientTransformation(init_fn, update_fn), name)
