"""`adaptive`: percentile clipping with safeguards, needing no tuning."""

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


class AdaptiveState(NamedTuple):
  """State of `adaptive`.

  Attributes:
    grad_norm: Global L2 norm of the last incoming updates (float32).
    clip_threshold: The threshold of the last update.
    clip_scale: The factor the last updates were multiplied by.
    norm_history: Ring buffer of the last `history` finite norms, each capped
      at ``(1 + growth)`` times the threshold before it (float32).
    norm_count: int32 count of norms written to `norm_history`, kept below
      ``2 * history``.
  """

  grad_norm: jax.Array
  clip_threshold: jax.Array
  clip_scale: jax.Array
  norm_history: jax.Array
  norm_count: jax.Array


_metrics.register_state(
    AdaptiveState, "grad_norm", "clip_threshold", "clip_scale"
)


def adaptive(
    percentile: jax.typing.ArrayLike = 10.0,
    history: int = 100,
    *,
    growth: jax.typing.ArrayLike = 0.01,
    max_norm: jax.typing.ArrayLike | None = 1.0,
    axis_name: _numerics.AxisName = None,
) -> optax.GradientTransformation:
  r"""Clips the global norm to a percentile of recent norms; no tuning needed.

  With :math:`n_t` the global L2 norm of the updates and :math:`c_{t-1}` the
  previous threshold (:math:`c_0 = \infty`), each step records

  .. math::
    h_t = \min\bigl(n_t,\ (1 + \gamma)\, c_{t-1}\bigr)

  in a window :math:`H_t` of the last `history` records, then clips to

  .. math::
    c_t = \min\bigl(\operatorname{percentile}(H_t, p),\ \text{max_norm}\bigr),
    \qquad g \leftarrow g \cdot \min\left(1, \frac{c_t}{n_t}\right).

  This is AutoClip's rule (:func:`autoclip`) with three safeguards, each
  answering a way the plain rule fails on exploding gradients:

  - **A ceiling** (`max_norm`, 1.0 by default, the customary fixed
    threshold). AutoClip never clips its first step, whose norm is its whole
    history; with SGD that one step can throw the weights out of range for
    good. The ceiling also bounds the step SGD takes, which is what sets its
    stability.
  - **Capped records.** AutoClip's history follows the norms wherever they
    go, so while gradients explode its threshold explodes with them. Here a
    norm enters the window capped at :math:`(1+\gamma)` times the previous
    threshold: the threshold can rise by at most the factor
    :math:`1+\gamma` per step (`growth`), and a burst of large norms cannot
    drag it up.
  - **A recent window** (`history`, 100 steps): the threshold follows the
    norms down as training settles, instead of remembering the early steps.

  With the defaults the threshold settles near the 10th percentile of recent
  norms when that is below 1.0, and at 1.0 otherwise. Below the threshold the
  updates pass through unchanged, bit for bit.

  A step whose norm is NaN or inf leaves the window and its count exactly as
  they were; its updates pass through unchanged (they stay non-finite). The
  metrics in the state still report that step.

  Args:
    percentile: The percentile :math:`p` in [0, 100] of the window to clip
      to. May be traced.
    history: Structural: the window length (an int >= 1; it fixes the shape
      of the state).
    growth: :math:`\gamma` >= 0, the most the threshold may rise per step,
      relative.
    max_norm: The ceiling on the threshold, a non-negative number, or None
      for no ceiling (then step 1 is not clipped).
    axis_name: Mapped axis name(s) over which the norm is global under
      `shard_map`/`pmap`; see :func:`global_norm`.

  Returns:
    A :class:`optax.GradientTransformation` with state `AdaptiveState`.

  Raises:
    ValueError: If `percentile` is outside [0, 100], `history` < 1, `growth`
      is negative or `max_norm` is negative.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_clipkit as clipkit
    >>> tx = optax.chain(clipkit.adaptive(), optax.sgd(1e-2, momentum=0.9))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([30.0, 40.0, 0.0])}
    >>> updates, state = tx.update(grads, state, params)
    >>> float(clipkit.metrics(state)["clip_threshold"])
    1.0
  """
  _validation.check_number(
      "percentile", percentile, low=0.0, high=100.0,
      expected="a number in [0, 100]",
  )
  size = _validation.check_int("history", history, low=1)
  _validation.check_threshold("growth", growth)
  _validation.check_optional_threshold("max_norm", max_norm)

  def init_fn(params):
    _validation.check_float_leaves(params)
    return AdaptiveState(
        *_global_norm.init_norm_metrics(jnp.inf),
        norm_history=jnp.zeros((size,), jnp.float32),
        norm_count=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None):
    del params
    updates, fields = _history.percentile_clip(
        updates, state, percentile, growth=growth, max_norm=max_norm,
        axis_name=axis_name,
    )
    return updates, AdaptiveState(*fields)

  return optax.GradientTransformation(init_fn, update_fn)
