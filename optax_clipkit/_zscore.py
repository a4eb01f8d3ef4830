"""ZClip: clipping gradient-norm spikes by their z-score against an EMA."""

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


class ZClipState(NamedTuple):
  """State of `zclip`.

  Attributes:
    grad_norm: Global L2 norm of the last incoming updates (float32).
    clip_threshold: The norm above which the last update would be clipped,
      :math:`\\mu + z_\\text{thr}(\\sigma + \\epsilon)` capped at `max_norm`;
      during warm-up `max_norm`, or 0 without one. (A clipped update's norm
      is ``grad_norm * clip_scale``, below this.)
    clip_scale: The factor the last updates were multiplied by.
    norm_mean: The EMA mean :math:`\\mu` of the norms (0 during warm-up).
    norm_std: :math:`\\sigma = \\sqrt{\\sigma^2}`, reported as a metric.
    norm_z: The z-score of the last norm (0 during warm-up).
    norm_var: The EMA variance :math:`\\sigma^2` of the norms.
    warmup_norms: The finite norms seen during warm-up (float32).
    warmup_count: int32 count of finite norms seen, saturating at `warmup`.
  """

  grad_norm: jax.Array
  clip_threshold: jax.Array
  clip_scale: jax.Array
  norm_mean: jax.Array
  norm_std: jax.Array
  norm_z: jax.Array
  norm_var: jax.Array
  warmup_norms: jax.Array
  warmup_count: jax.Array


_metrics.register_state(
    ZClipState,
    "grad_norm",
    "clip_threshold",
    "clip_scale",
    "norm_mean",
    "norm_std",
    "norm_z",
)


def zclip(
    z_threshold: jax.typing.ArrayLike = 2.5,
    decay: jax.typing.ArrayLike = 0.97,
    warmup: int = 25,
    *,
    eps: jax.typing.ArrayLike = 1e-6,
    max_norm: jax.typing.ArrayLike | None = None,
    axis_name: _numerics.AxisName = None,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""ZClip: clips spikes of the global norm by their z-score.

  **Warm-up.** The first `warmup` finite norms are not z-clipped. When the
  last of them arrives, :math:`\mu` is their mean and :math:`\sigma^2` their
  population variance.

  **Afterwards**, with :math:`n` the global L2 norm of the updates and
  :math:`z_\text{thr}` the `z_threshold`,

  .. math::
    z = \frac{n - \mu}{\sigma + \epsilon}, \qquad
    n^* = \begin{cases}
      \mu + \frac{z_\text{thr}^2}{z}\,\sigma & z > z_\text{thr} \\
      n & \text{otherwise,}
    \end{cases}

  the updates are clipped to norm :math:`n^*` (the reciprocal rule), then

  .. math::
    \mu \leftarrow \beta\mu + (1-\beta)\,n^*, \qquad
    \sigma^2 \leftarrow \beta\sigma^2 + (1-\beta)\,(n^* - \mu)^2,

  with :math:`\beta` the `decay` and the *updated* :math:`\mu`, as in the
  reference code. `max_norm`, if given, is an absolute ceiling on the norm at
  every step, warm-up included; it does not enter the statistics.

  A step whose norm is NaN or inf leaves the statistics and counters exactly
  as they were, and its updates pass through unchanged (they stay
  non-finite). The metrics in the state still report that step. Finite
  updates whose norm is beyond float32's range are clipped to :math:`\mu`
  after warm-up (the rule's limit as :math:`z \to \infty`).

  As in the reference code, the statistics hold still where :math:`\sigma`
  is 0: a clipped norm enters them as :math:`\mu` itself. Warm-up norms
  that are all equal (zero gradients, say), or a norm held exactly constant
  long enough for :math:`\sigma^2` to decay to 0 in float32, then clip
  every later norm above :math:`\mu` to :math:`\mu`, for good.
  :func:`adaptive` reads the variance as at least a floor.

  Args:
    z_threshold: The z-score above which a norm is clipped, > 0.
    decay: The EMA decay :math:`\beta`, in (0, 1).
    warmup: Structural: the number of finite norms that initialise the
      statistics (an int >= 1; it fixes the shape of the state).
    eps: Added to :math:`\sigma` in the z-score, >= 0.
    max_norm: Optional absolute ceiling, a non-negative number.
    axis_name: Mapped axis name(s) over which the norm is global under
      `shard_map`/`pmap`; see :func:`global_norm`.
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    A :class:`optax.GradientTransformation` with state `ZClipState`; its
    metrics add ``norm_mean``, ``norm_std`` and ``norm_z``.

  Raises:
    ValueError: If `z_threshold` <= 0, `decay` is outside (0, 1), `warmup` <
      1, `eps` < 0 or `max_norm` is negative.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_clipkit as clipkit
    >>> tx = clipkit.zclip(warmup=3)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in (1.0, 2.0, 3.0, 100.0):
    ...   out, state = tx.update({"w": jnp.array([g])}, state)
    >>> round(float(out["w"][0]), 3)  # mu + z_thr**2 / z * sigma
    2.043

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025
  """
  _validation.check_number(
      "z_threshold", z_threshold, low=0.0, low_open=True,
      expected="a positive number",
  )
  _validation.check_number(
      "decay", decay, low=0.0, high=1.0, low_open=True, high_open=True,
      expected="a number in (0, 1)",
  )
  size = _validation.check_int("warmup", warmup, low=1)
  _validation.check_threshold("eps", eps)
  _validation.check_optional_threshold("max_norm", max_norm)

  def init_fn(params):
    _validation.check_float_leaves(params)
    zero = jnp.zeros((), jnp.float32)
    grad_norm, _, scale = _global_norm.init_norm_metrics()
    return ZClipState(
        grad_norm, in_force(None), scale,
        zero, zero, zero, zero,
        warmup_norms=jnp.zeros((size,), jnp.float32),
        warmup_count=jnp.zeros((), jnp.int32),
    )

  def rule(norm, ok, stats):
    mean, var, norms, count = stats
    zt = _numerics.as_f32(z_threshold)
    beta = _numerics.as_f32(decay)
    warm = count >= size
    # Warm-up: record the norm; on the last one, initialise the moments.
    # `jnp.asarray`: a state restored from a checkpoint may hold numpy arrays.
    norms = jnp.asarray(norms)
    norms = jnp.where(warm, norms, norms.at[jnp.minimum(count, size - 1)].set(norm))
    count = jnp.minimum(count + 1, size)
    first_mean = jnp.mean(norms)
    first_var = jnp.mean(jnp.square(norms - first_mean))
    # After warm-up: the z-score and the reciprocal rule.
    std = jnp.sqrt(var)
    z = (norm - mean) / (std + _numerics.as_f32(eps))
    # A norm beyond float32 (finite updates that overflow it) is the limit
    # z -> inf of the rule: clip to mu. (Its statistics are not kept.)
    spike = warm & ((z > zt) | ~ok)
    safe_z = jnp.where(spike & ok, z, 1.0)
    clipped = jnp.where(ok, mean + zt * zt / safe_z * std, mean)
    target = jnp.where(spike, clipped, norm)
    new_mean = beta * mean + (1 - beta) * target
    new_var = beta * var + (1 - beta) * jnp.square(target - new_mean)
    done = count >= size
    mean = jnp.where(warm, new_mean, jnp.where(done, first_mean, mean))
    var = jnp.where(warm, new_var, jnp.where(done, first_var, var))
    threshold = jnp.where(spike, clipped, jnp.inf)
    return threshold, (mean, var, norms, count, jnp.where(warm, z, 0.0))

  def in_force(state):
    """mu + z_thr (sigma + eps) capped at `max_norm`; before: `max_norm` or 0."""
    t = jnp.asarray(jnp.inf, jnp.float32)
    if state is not None:  # None at init: still warming up.
      trigger = state.norm_mean + _numerics.as_f32(z_threshold) * (
          jnp.sqrt(state.norm_var) + _numerics.as_f32(eps))
      t = jnp.where(state.warmup_count >= size, trigger, t)
    t = _history.ceiling(t, max_norm)
    return jnp.where(jnp.isfinite(t), t, 0.0)

  def update_fn(updates, state, params=None):
    del params
    stats = (state.norm_mean, state.norm_var, state.warmup_norms,
             state.warmup_count, state.norm_z)
    updates, stats, (norm, threshold, scale) = _history.adaptive_clip(
        updates, stats, lambda n, ok, s: rule(n, ok, s[:4]),
        max_norm=max_norm, axis_name=axis_name,
    )
    mean, var, norms, count, z = stats
    del threshold  # Reported: the threshold in force, finite (see below).
    return updates, ZClipState(
        norm, in_force(state), scale, mean, jnp.sqrt(var), z, var, norms,
        count
    )

  return _metrics.named(optax.GradientTransformation(init_fn, update_fn), name)
