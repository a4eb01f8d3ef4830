"""`adaptive`: clipping to a fraction of the recent median norm, untuned."""

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
      at ``(1 + growth)`` times the level before it (float32).
    norm_count: int32 count of norms written to `norm_history`, kept below
      ``2 * history``.
    norm_level: The `percentile` of `norm_history` (inf before the first
      finite norm); the threshold is ``scale * norm_level``.
  """

  grad_norm: jax.Array
  clip_threshold: jax.Array
  clip_scale: jax.Array
  norm_history: jax.Array
  norm_count: jax.Array
  norm_level: jax.Array


_metrics.register_state(
    AdaptiveState, "grad_norm", "clip_threshold", "clip_scale"
)


def adaptive(
    percentile: jax.typing.ArrayLike = 50.0,
    history: int = 100,
    *,
    scale: jax.typing.ArrayLike = 0.1,
    growth: jax.typing.ArrayLike = 0.01,
    max_norm: jax.typing.ArrayLike | None = None,
    axis_name: _numerics.AxisName = None,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""Clips the global norm to a tenth of the recent median norm; no tuning.

  With :math:`n_t` the global L2 norm of the updates, each step records

  .. math::
    h_t = \min\bigl(n_t,\ (1 + \gamma)\, m_{t-1}\bigr)

  in a window :math:`H_t` of the last `history` records
  (:math:`m_0 = \infty`), and clips to

  .. math::
    m_t = \operatorname{percentile}(H_t, p), \qquad
    c_t = \min(s\, m_t,\ \text{max_norm}), \qquad
    g \leftarrow g \cdot \min\left(1, \frac{c_t}{n_t}\right),

  with :math:`p` the `percentile` (the median by default), :math:`s` the
  `scale` (0.1) and :math:`\gamma` the `growth` (0.01).

  It starts from AutoClip's idea (:func:`autoclip`: clip to a percentile of
  past norms) and changes what makes AutoClip fail on exploding gradients:

  - **Every step is clipped, step 1 included**, to a fraction of the typical
    recent norm. AutoClip never clips its first step, whose norm is its whole
    history, and with SGD that one step can throw the weights out of range
    for good. With SGD the threshold acts as the step size (the update is the
    learning rate times the threshold, in the gradient's direction), so it
    must sit well below the norms, and follow them down as training settles:
    this gives SGD a step that anneals with the gradient norm. Adam divides
    out the scale of its inputs, so for Adam the rule keeps the direction and
    the step-to-step shape of the gradients but removes spikes.
  - **Records are capped.** AutoClip's history follows the norms wherever
    they go, so while gradients explode its threshold explodes with them.
    Here a norm enters the window capped at :math:`1+\gamma` times the last
    level: the level can rise by at most :math:`1+\gamma` per step, and a
    burst of large norms cannot drag it up.
  - **A recent window** (`history`, 100 steps), so the level follows the
    norms as training progresses rather than remembering the early steps.

  On the exploding-gradient tasks of ``benchmarks/exploding.py`` (an MLP
  regression with unscaled targets, a vanilla RNN and an LSTM through 30
  steps, each with SGD + momentum and with Adam; median of 3 seeds) these
  defaults never diverged. Against the best fixed threshold in hindsight they
  ended 16x better on the regression with SGD and 9x better with Adam (the
  threshold anneals with the norms), but 3-7x worse on the recurrent
  networks. The price is also paid where nothing explodes: on the same
  regression with standardised targets, SGD ended about 12x worse than
  without clipping (the rule behaves like a smaller learning rate), while
  Adam did as well as without clipping. If your gradients do not explode and
  you train with SGD, prefer :func:`global_norm` with a generous threshold,
  or raise `scale`.

  A step whose norm is NaN or inf leaves the window, its count and the level
  exactly as they were; its updates pass through unchanged (they stay
  non-finite). The metrics in the state still report that step.

  Args:
    percentile: The percentile :math:`p` in [0, 100] of the window. May be
      traced.
    history: Structural: the window length (an int >= 1; it fixes the shape
      of the state).
    scale: :math:`s` >= 0, the fraction of the level to clip to.
    growth: :math:`\gamma` >= 0, the most the level may rise per step,
      relative.
    max_norm: Optional absolute ceiling on the threshold, a non-negative
      number.
    axis_name: Mapped axis name(s) over which the norm is global under
      `shard_map`/`pmap`; see :func:`global_norm`.
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    A :class:`optax.GradientTransformation` with state `AdaptiveState`.

  Raises:
    ValueError: If `percentile` is outside [0, 100], `history` < 1, or
      `scale`, `growth` or `max_norm` is negative.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_clipkit as clipkit
    >>> tx = optax.chain(clipkit.adaptive(), optax.sgd(1e-2, momentum=0.9))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([30.0, 40.0, 0.0])}
    >>> updates, state = tx.update(grads, state, params)
    >>> float(clipkit.metrics(state)["clip_threshold"])  # 0.1 * 50
    5.0
  """
  _validation.check_percentile("percentile", percentile)
  size = _validation.check_int("history", history, low=1)
  _validation.check_threshold("scale", scale)
  _validation.check_threshold("growth", growth)
  _validation.check_optional_threshold("max_norm", max_norm)

  def init_fn(params):
    _validation.check_float_leaves(params)
    inf = jnp.asarray(jnp.inf, jnp.float32)
    return AdaptiveState(
        *_global_norm.init_norm_metrics(inf),
        norm_history=jnp.zeros((size,), jnp.float32),
        norm_count=jnp.zeros((), jnp.int32),
        norm_level=inf,
    )

  def update_fn(updates, state, params=None):
    del params
    updates, history, metrics = _history.percentile_clip(
        updates,
        (state.norm_history, state.norm_count, state.norm_level),
        percentile,
        growth=growth,
        scale=scale,
        max_norm=max_norm,
        axis_name=axis_name,
    )
    return updates, AdaptiveState(*metrics, *history)

  return _metrics.named(optax.GradientTransformation(init_fn, update_fn), name)
