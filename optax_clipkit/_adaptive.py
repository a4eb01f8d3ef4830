"""`adaptive`: clips only while the loss rises, and norm spikes; no tuning.

The rule is a controller on the threshold in the manner of the bold driver
(Battiti 1989) and of TCP's congestion control (slow start, then
multiplicative decrease on trouble, slow recovery): it starts tight, releases
quickly while the steps taken lower the loss, cuts the threshold while they
raise it, and clips norm spikes by their z-score in log space.

Whether the last step raised the loss is estimated without the loss, from
the step taken, :math:`d_t = \\theta_t - \\theta_{t-1}`, and the gradients at
both ends, by the trapezoid rule
:math:`\\Delta L_t \\approx \\tfrac12 (g_{t-1} + g_t) \\cdot d_t` (exact on a
quadratic), less the minibatch noise that the step's own gradient puts into
it (estimated from a fit of the step to the last step and gradient, and, in
two ways that err in different places, from two independent minibatch
gradients: the lower of the two readings counts). The dot products run over
a fixed strided subset of coordinates of every leaf (about `coordinates`
in all, at least one per leaf), weighted by each leaf's size over its
share, so the estimate is global, cheap, and needs no copy of the
parameters. The kept coordinates are packed into one vector, so that the
dot products are one small reduction, not two per leaf: on a GPU each is a
kernel launch. Under GSPMD sharding only that vector (about 1 KB) is
gathered, never a leaf.

Where the loss is passed (``tx.update(g, state, params, loss=loss)``), a
sustained rise of the observed loss is trouble too: a second, independent
reading of the same question.

Limits: without `params` (``tx.update(g, state)``) there is no loss
estimate, and the rule is its slow start followed by spike clipping alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_clipkit import _global_norm
from optax_clipkit import _history
from optax_clipkit import _metrics
from optax_clipkit import _numerics
from optax_clipkit import _tactics
from optax_clipkit import _validation

# The loss watch: a rise is the fast EMA (decay `_FAST`) of the loss above
# its value `_LAG` steps earlier by more than `_RISE` times the typical
# single-step change (an EMA with decay `_SLOW`).
_FAST, _SLOW, _RISE, _LAG = 0.9, 0.99, 1.0, 10
# A sustained rise: the trend of the loss estimate over a slow EMA (decay
# `_SUSTAINED_DECAY`) above `_SUSTAINED`. Cuts may then take the threshold
# below its floor, down to `_BELOW` times the (geometric) mean norm.
_SUSTAINED_DECAY, _SUSTAINED, _BELOW = 0.99, 0.1, 0.05
# The evidence that a sustained rise of the passed loss counts as: the level
# of a clear rise, as for a released run at the default `trouble`.
_CLEAR = 0.5
# The spike cap reads the log norms' variance as at least this: a norm held
# exactly constant for some 2,000 steps underflows the variance to 0, and
# the cap, at the mean, then clips every rise as a spike, for good.
_VAR_FLOOR = 1e-4
# The first threshold is at most this multiple of the parameters' norm (as
# the subset estimates it): a first gradient thousands of times larger than
# the parameters (a deep residual net without normalization) would otherwise
# be let through at 1% of its norm, and wipe them out on the first step.
# Every task of the study starts below 1.4x, so that none of them changes.
_PARAM_CAP = 2.0
# A step of a fixed norm: Lion's sign steps move every coordinate by the
# learning rate, whatever the updates' scale, so a cut cannot shrink them;
# it only leaves the optimizer's momentum, built from the updates before the
# cut, in charge of the direction. Such a step is told by the bends (second
# differences) of the log of its squared norm over the subset: their
# squares' EMA (decay `_BEND_DECAY`, each square read as at most 1) below
# `_FIXED_STEP` while those of the log norm the updates were clipped to are
# above `_VARIED_NORM`, so that a run whose norm does not move (clipped to a
# threshold held constant, say) tells nothing. The step's EMA starts at
# `_BEND_START`, about 20 steps above `_FIXED_STEP`. What each optimizer
# reads: docs/adaptive.md, "Steps of a fixed norm".
_BEND_DECAY, _BEND_START, _FIXED_STEP, _VARIED_NORM = 0.8, 1e-2, 1e-4, 1e-3

# A step that leaves the parameters in place (on the subset) is no step to
# read: the estimate waits for the one that moves them (the micro-steps of
# `optax.MultiSteps` chained after `adaptive()`). After this many calls in
# place it stops waiting, and reads each call as a step of no change, so
# that a run whose steps round to nothing (bf16 parameters, a tiny rate)
# still grows its threshold.
_MAX_HOLD = 64

# Values of `clip_cause`.
NONE, START, OVERSHOOT, SPIKE, CEILING = 0.0, 1.0, 2.0, 3.0, 4.0


# The controller's statistics: one float32 vector, `AdaptiveState.stats`, of
# these (name, shape); the three subset vectors are the rows of a second
# array, `AdaptiveState.subset`. On a GPU each array of a state is written
# by a kernel of its own: with the statistics in 13 arrays, an `adaptive()`
# + AdamW step of 16M parameters took 1.17-1.30x AdamW's time on an H200,
# 1.07-1.17x with them in one vector (2026-11-27; docs/adaptive.md,
# "Results", goal 5). The subset is an array of its own because under
# `shard_map` it differs from device to device (each packs its own shards)
# while the statistics, computed from sums over the axis, do not.
_STATS = (("log_threshold", ()), ("log_floor", ()), ("norm_mean", ()),
          ("norm_var", ()), ("recovering", ()), ("norm_count", ()),
          ("estimate_count", ()), ("grad_count", ()),
          ("trend_sums", (2, 2)), ("slow_sums", (2,)),
          ("step_dots", (4,)), ("step_bends", (4,)), ("norm_bends", (4,)),
          ("loss_stats", (4 + _LAG + 1,)))
_N_STATS = sum(math.prod(shape) for _, shape in _STATS)
_VECTORS = ("prev_params", "prev_grads", "prev_step")
_COUNTS = ("norm_count", "estimate_count")


def _unpack(stats: jax.Array, subset: jax.Array) -> dict[str, jax.Array]:
  """The statistics in `stats` and `subset` (with any batch dimensions)."""
  out, start = {}, 0
  for name, shape in _STATS:
    size = math.prod(shape)
    out[name] = stats[..., start:start + size].reshape(
        stats.shape[:-1] + shape)
    start += size
  for name in _COUNTS:
    out[name] = out[name].astype(jnp.int32)
  for i, name in enumerate(_VECTORS):
    out[name] = subset[..., i, :]
  return out


def _pack(values: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """`_unpack`'s inverse, for unbatched statistics."""
  return (jnp.concatenate([jnp.asarray(values[name], jnp.float32).reshape(-1)
                           for name, _ in _STATS]),
          jnp.stack([values[v] for v in _VECTORS]))


def _stat(name: str) -> property:
  return property(lambda self: _unpack(self.stats, self.subset)[name],
                  doc=f"`{name}`, read from `stats` or `subset`.")


class AdaptiveState(NamedTuple):
  """State of `adaptive`.

  The metrics are fields of their own; the controller's statistics are one
  float32 vector, `stats`, the subset buffers one float32 array, `subset`,
  and each can be read by its name (an attribute).

  Attributes:
    grad_norm: Global L2 norm of the last incoming updates (float32).
    clip_threshold: The threshold applied to the last update: the lowest of
      the controller's, the spike cap and `max_norm` (once released, the
      spike cap or `max_norm`).
    clip_scale: The factor the last updates were multiplied by.
    clip_cause: Why the last updates were clipped: 0 not clipped, 1 the
      slow start, 2 the controller after the loss has been seen rising, 3 a
      norm spike, 4 `max_norm` (where it is below the rule's threshold).
    loss_trend: The trend :math:`T_t` in [-1, 1] of the estimated loss
      changes: below 0 the loss falls, above `trouble` it is rising (the
      lower of the trends of the two noise estimates).
    stats: The statistics below, from `log_threshold` to `loss_stats` in
      this order, as one float32 vector of 41 entries.
    subset: `prev_params`, `prev_grads` and `prev_step`, the rows of one
      float32 array of shape (3, about `coordinates`); under `shard_map`,
      each device's own.
    log_threshold: The controller's threshold, :math:`\\log c_t`.
    log_floor: Its floor, :math:`\\log c_1`.
    norm_mean: EMA mean of the log norms (after spike capping).
    norm_var: EMA variance of the log norms.
    recovering: 1.0 once the loss has been seen rising (slow recovery), else
      0.0 (slow start).
    norm_count: Count of steps with a finite, non-zero norm, saturating at
      2 (read as int32).
    estimate_count: The same, counting steps that moved the parameters,
      reset by a step without `params`: the loss estimate needs two steps
      with them in a row (read as int32).
    grad_count: How many gradients `prev_grads` averages: those of the
      steps since the parameters last moved (one, unless steps leave the
      parameters in place, as the micro-steps of `optax.MultiSteps` do
      where `adaptive()` is chained before it; float32, saturating at 64,
      after which each call is read as a step again).
    trend_sums: EMAs of :math:`\\Delta L` (first row) and of its scale
      (second row), one column per noise estimate (2 x 2 floats).
    slow_sums: The same over the slow EMA that tells a sustained rise,
      for the product's noise estimate only (2 floats).
    step_dots: :math:`\\langle g_{t-1}, d_{t-1}\\rangle_S`,
      :math:`\\langle g_{t-1}, g_{t-2}\\rangle_S`,
      :math:`\\langle g_{t-2}, d_{t-1}\\rangle_S` and :math:`|g_{t-2}|_S^2`,
      from the last finite step that moved the parameters: there
      :math:`g_{t-1}` is that call's gradient and :math:`g_{t-2}` is
      `prev_grads`. The first is then averaged over the calls since, as
      `prev_grads` is, so that it reads the step against their mean.
    step_bends: For a step of a fixed norm: the log of the last step's
      squared norm :math:`|d_{t-1}|_S^2`, its last difference, how many of
      the two are known (0 to 2), and the EMA of the squared second
      differences (4 floats).
    norm_bends: The same for the log of the norm the updates were clipped
      to.
    loss_stats: The loss watch (15 floats): the last finite loss passed (NaN
      before any), the EMA of the absolute single-step change and its total
      weight, the count of losses (saturating at 10), and the fast EMA of the
      loss over the last 11 steps.
    prev_params: The parameters' subset coordinates at the last finite step,
      a vector of about `coordinates` entries.
    prev_grads: The gradients' subset coordinates at the last finite step
      (their mean over the finite, non-zero-norm steps since the
      parameters last moved).
    prev_step: The subset coordinates of the step before that one,
      :math:`d_{t-1}`.
  """

  grad_norm: jax.Array
  clip_threshold: jax.Array
  clip_scale: jax.Array
  clip_cause: jax.Array
  loss_trend: jax.Array
  stats: jax.Array
  subset: jax.Array


# Each statistic an attribute, from the layout itself.
for _name in [name for name, _ in _STATS] + list(_VECTORS):
  setattr(AdaptiveState, _name, _stat(_name))
del _name


_metrics.register_state(
    AdaptiveState, "grad_norm", "clip_threshold", "clip_scale", "clip_cause",
    "loss_trend",
)


def _strides(shape: tuple[int, ...], budget: int) -> tuple[int, ...]:
  """Equal strides per dimension keeping at most about `budget` elements."""
  size = int(np.prod(shape, dtype=np.int64))
  if not shape or size <= budget:
    return (1,) * len(shape)
  # A power of two, so that the kept coordinates split evenly between the
  # shards of the usual (power-of-two) shardings.
  s = 2 ** max(0, math.ceil(math.log2((size / budget) ** (1.0 / len(shape)))))
  return (s,) * len(shape)


class _Subset(NamedTuple):
  """Which coordinates the loss estimate reads, fixed by the leaves' shapes.

  `strides` per leaf (None for an empty leaf); `weights` per kept coordinate,
  in the order `pack` gives them: the leaf's size over its share. A complex
  leaf's coordinates count twice, as their real and imaginary parts (the
  real part of :math:`\bar x y` sums both products).
  """

  strides: tuple[tuple[int, ...] | None, ...]
  weights: np.ndarray

  def pack(self, leaves) -> jax.Array:
    """The kept coordinates of all leaves, as one float32 vector.

    One vector rather than one small array per leaf: the dot products are
    then one reduction, not two per leaf (on a GPU, a kernel launch each).
    Leaves sharded over a mesh of explicit axes are sliced shard by shard
    there too, and only the vector is gathered.
    """
    mesh = _explicit_mesh(leaves)
    if mesh is None:
      return self._pack(leaves)
    return jax.sharding.auto_axes(
        self._pack, out_sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))(leaves)

  def _pack(self, leaves) -> jax.Array:
    parts = []
    for x, s in zip(leaves, self.strides):
      if s is None:
        continue
      kept = x[tuple(slice(None, None, k) for k in s)].reshape(-1)
      if jnp.iscomplexobj(kept):
        parts += [jnp.real(kept), jnp.imag(kept)]
      else:
        parts.append(kept)
    return (jnp.concatenate([_numerics.as_f32(x) for x in parts]) if parts
            else jnp.zeros((0,), jnp.float32))


def _explicit_mesh(leaves):
  """The mesh of the first leaf sharded over explicit axes, or None."""
  if not hasattr(jax, "typeof"):
    return None  # A jax without explicit sharding.
  for x in leaves:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if _tactics.has_axis_type(mesh, "Explicit"):
      return mesh
  return None


def _subset(leaves, coordinates: int) -> _Subset:
  """About `coordinates` coordinates, each leaf's share by size."""
  sizes = [int(np.prod(x.shape, dtype=np.int64)) for x in leaves]
  total = max(sum(sizes), 1)
  strides, weights = [], []
  for x, size in zip(leaves, sizes):
    if size == 0:
      strides.append(None)
      continue
    budget = max(1, round(coordinates * size / total))
    strides.append(_strides(x.shape, budget))
    kept = int(np.prod([-(-n // k) for n, k in zip(x.shape, strides[-1])],
                       dtype=np.int64))
    parts = 2 if jnp.iscomplexobj(x) else 1  # Real and imaginary parts.
    weights.append(np.full(kept * parts, size / kept, np.float32))
  return _Subset(tuple(strides), np.concatenate(weights) if weights
                 else np.zeros((0,), np.float32))


def _bend(x, memory, valid):
  """The EMA of the squared second differences of `x`, step by step.

  `memory` holds the last `x`, its last difference, how many of the two are
  known (0 to 2) and the EMA. A step where `x` is not `valid` forgets the
  differences and keeps the EMA.
  """
  last, slope, known, ema = memory[0], memory[1], memory[2], memory[3]
  new_slope = x - last
  bent = valid & (known >= 2)
  ema = jnp.where(bent, _BEND_DECAY * ema + (1 - _BEND_DECAY)
                  * jnp.minimum(jnp.square(new_slope - slope), 1.0), ema)
  return jnp.stack([
      jnp.where(valid, x, last),
      jnp.where(valid & (known >= 1), new_slope, 0.0),
      jnp.where(valid, jnp.minimum(known + 1, 2.0), 0.0),
      ema])


def _self_noise(a, d1d1, g1g1, dd1, step_dots, valid):
  r"""Two estimates of the minibatch noise `a` holds through the step.

  Fits :math:`d_t \approx \beta d_{t-1} - \eta g_{t-1}` by least squares
  over the subset (exact for SGD with momentum, whatever the clipping; for a
  diagonal preconditioner :math:`P`, :math:`\eta |g|^2 = g^\top P g`), and
  returns :math:`\eta` times two estimates of the noise's
  :math:`|\xi_{t-1}|^2`, each from the two minibatch gradients
  :math:`g_{t-1}, g_{t-2}` (independent noises), and each holding besides a
  part of the change of the true gradient over the step :math:`d_{t-1}`:

  - the *product*, :math:`|g_{t-1}|^2 - \max(\langle g_{t-1},
    g_{t-2}\rangle, 0)`, exact while the true gradient holds still, and
    reading all of it as noise where it flips (an oscillation across a
    valley, as at the edge of stability);
  - the *projection*, :math:`\tfrac12 |\Delta g_\perp|^2` with
    :math:`\Delta g = g_{t-1} - g_{t-2}` less its component along
    :math:`d_{t-1}`: blind to a change along the step itself (that
    oscillation), but short of the noise that :math:`d_{t-1}` carries of
    :math:`g_{t-2}` (a step made mostly of its own last gradient).

  Zero where the fit is ill-posed (fewer than two earlier steps, or
  :math:`d_{t-1}` and :math:`g_{t-1}` nearly parallel) or not finite.
  `d1d1`, `g1g1` and `dd1` are :math:`|d_{t-1}|^2`, :math:`|g_{t-1}|^2` and
  :math:`\langle d_t, d_{t-1}\rangle`; `step_dots` holds
  :math:`\langle g_{t-1}, d_{t-1}\rangle`,
  :math:`\langle g_{t-1}, g_{t-2}\rangle`,
  :math:`\langle g_{t-2}, d_{t-1}\rangle` and :math:`|g_{t-2}|^2`.
  """
  b1, gg1, ga1, g2g2 = step_dots[0], step_dots[1], step_dots[2], step_dots[3]
  det = d1d1 * g1g1 - b1 * b1
  ok = valid & (det > 1e-3 * d1d1 * g1g1) & (d1d1 > 0)
  eta = (d1d1 * a + b1 * dd1) / jnp.where(ok, det, 1.0)
  product = g1g1 - jnp.maximum(gg1, 0.0)
  along = b1 - ga1  # <g_{t-1} - g_{t-2}, d_{t-1}>
  projection = 0.5 * jnp.maximum(
      g1g1 - 2 * gg1 + g2g2 - along * along / jnp.where(ok, d1d1, 1.0), 0.0)
  noise = jnp.maximum(eta, 0.0) * jnp.stack([product, projection])
  return jnp.where(ok & jnp.isfinite(noise), noise, 0.0)


def _check_params(params, updates) -> None:
  """Raises ValueError unless `params` have the updates' leaf shapes."""
  p_leaves = jax.tree.leaves(params)
  paths = jax.tree_util.tree_flatten_with_path(updates)[0]
  if len(p_leaves) != len(paths):
    raise ValueError(
        "`params` must have the leaves and shapes of the updates, got"
        f" {len(p_leaves)} leaves ({jax.tree.structure(params)}) for the"
        f" updates' {len(paths)} ({jax.tree.structure(updates)}).")
  for p, (path, u) in zip(p_leaves, paths):
    if p.shape != u.shape:
      raise ValueError(
          "`params` must have the leaves and shapes of the updates, got"
          f" shape {p.shape} for the leaf {jax.tree_util.keystr(path)} of"
          f" the updates, of shape {u.shape}.")


def _ratio(sums):
  """Trends in [-1, 1] from the EMAs of the rises and of their scale."""
  positive = sums[1] > 0
  return jnp.where(positive, sums[0] / jnp.where(positive, sums[1], 1.0), 0.0)


def _watch(loss: jax.Array, watch: jax.Array):
  """Whether the loss is in a sustained rise, and the updated watch.

  `watch` holds the last finite loss (NaN before any), the EMA of
  ``|loss_t - loss_{t-1}|``, that EMA's total weight ``1 - 0.99**k`` (its
  bias correction), the count of finite losses (saturating), and the fast
  EMA of the loss over the last `_LAG` + 1 finite steps, oldest first. A
  loss that is not finite changes nothing.
  """
  last, change, weight, count = watch[0], watch[1], watch[2], watch[3]
  levels = watch[4:]
  finite = jnp.isfinite(loss)
  first = ~jnp.isfinite(last)
  change = jnp.where(first, change, _SLOW * change
                     + (1 - _SLOW) * jnp.abs(loss - last))
  weight = jnp.where(first, weight, _SLOW * weight + (1 - _SLOW))
  fast = jnp.where(first, loss, _FAST * levels[-1] + (1 - _FAST) * loss)
  levels = jnp.concatenate([levels[1:], fast[None]])
  typical = change / jnp.where(weight > 0, weight, 1.0)
  rising = (finite & (count >= _LAG) & (typical > 0)
            & (fast - levels[0] > _RISE * typical))
  new = jnp.concatenate(
      [jnp.stack([loss, change, weight, jnp.minimum(count + 1, _LAG)]),
       levels])
  return rising, jnp.where(finite, new, watch)


def adaptive(
    start: jax.typing.ArrayLike = 0.01,
    *,
    slow_start: jax.typing.ArrayLike = 1.1,
    recovery: jax.typing.ArrayLike = 1.02,
    cut_rate: jax.typing.ArrayLike = 0.4,
    trouble: jax.typing.ArrayLike = 0.0,
    trend_decay: jax.typing.ArrayLike = 0.9,
    release: jax.typing.ArrayLike = 4.0,
    spike_z: jax.typing.ArrayLike = 3.0,
    spike_decay: jax.typing.ArrayLike = 0.95,
    coordinates: int = 256,
    max_norm: jax.typing.ArrayLike | None = None,
    axis_name: _numerics.AxisName = None,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""Clips while the loss rises and on norm spikes; otherwise lets go.

  A controller on the threshold :math:`c_t`: a slow start from a tight
  threshold, a cut whenever the steps taken raise the loss, a slow recovery,
  and release (no threshold) once :math:`c_t` is well above the norms; norm
  spikes are clipped by their z-score throughout. With SGD, while the
  gradients are clipped the threshold *is* the step size, so the controller
  searches the largest step that still lowers the loss, as the bold driver
  does for the learning rate; a run whose steps never raise the loss is
  released within about a hundred steps and then only spikes are clipped.

  Designed and measured with SGD with momentum and with Adam/AdamW. Steps
  of a fixed norm, as Lion's (with a small weight decay), are told apart
  some 40 steps in, and then not cut (below). With RMSProp or plain SGD the
  loss estimate misreads some runs, and its cuts can do harm; see
  ``docs/adaptive.md``, "Other optimizers".

  **Loss estimate.** With :math:`d_t = \theta_t - \theta_{t-1}` the step
  taken (whatever the optimizer) and :math:`g_t` the incoming updates,

  .. math::
    a^{(j)}_t = -\langle g_{t-1}, d_t\rangle_S - \hat\eta_t \nu^{(j)}_t,
    \quad b_t = \langle g_t, d_t\rangle_S,

  .. math::
    \Delta L_t \approx \tfrac12 (b_t - a_t), \quad
    T^{(j)}_t = \frac{\operatorname{EMA}_\beta(b - a^{(j)})}
               {\operatorname{EMA}_\beta(|a^{(j)}| + |b|)}, \quad
    T_t = \min_j T^{(j)}_t \in [-1, 1],

  where :math:`\langle x, y\rangle_S` sums :math:`x_i y_i` over a fixed
  strided subset of each leaf's coordinates (about `coordinates` in all, each
  leaf's share proportional to its size), weighted by the leaf's size over
  its share; :math:`\beta` is `trend_decay`. :math:`T_t < 0` while the loss
  falls; the loss rises at step :math:`t` when :math:`b_t > a_t`.
  :math:`a_t` is the trapezoid rule's first-order decrease,
  :math:`-\langle g_{t-1}, d_t\rangle`, less the minibatch noise it holds:
  the step was taken along its own noisy gradient, so the plain product
  reads an extra :math:`\eta |\xi|^2` of decrease (SGD's learning rate
  :math:`\eta`), enough to read a noise-dominated run whose loss climbs as
  falling. :math:`\hat\eta_t` is the least-squares fit of
  :math:`d_t \approx \beta' d_{t-1} - \eta g_{t-1}` over the subset (exact
  for SGD with momentum; clipped to :math:`\ge 0`; 0 while fewer than two
  steps are known or the fit is ill-posed), and :math:`\nu^{(j)}_t` are two
  estimates of the noise's :math:`|\xi_{t-1}|^2` from the minibatch
  gradients :math:`g_{t-1}, g_{t-2}`, whose noises are independent:
  the *product* :math:`\nu^{(1)} = |g_{t-1}|_S^2 - \max(\langle g_{t-1},
  g_{t-2}\rangle_S, 0)` and the *projection* :math:`\nu^{(2)} =
  \tfrac12 |\Delta g_\perp|_S^2`, with :math:`\Delta g = g_{t-1} - g_{t-2}`
  less its component along :math:`d_{t-1}`. Each also reads part of the
  change of the true gradient between the two steps as noise, and so errs
  toward a rise: the product where the gradient flips from step to step (an
  oscillation across a valley, as at the edge of stability, which the
  trapezoid rule already reads as flat), the projection where it changes
  across the step's direction. The projection also misses the part of
  :math:`g_{t-2}`'s noise that :math:`d_{t-1}` carries, so on a noisy
  plateau the trend reads about 0 to slightly below. :math:`j` picks the
  lower trend, and :math:`a_t = a^{(j)}_t`. While the controller clips, a
  rise is trouble at the default :math:`\tau = 0`; once released, only a
  clear rise is.

  **Controller.** On the first finite step
  :math:`\log c_1 = \min(\log n_1 + \log s,\ \log 2|\theta_0|_S)`
  (:math:`s` the `start`; :math:`|\theta_0|_S` the parameters' norm as the
  subset estimates it, left out where it is 0 or the first step has no
  `params`): a first gradient far larger than the parameters, as in a deep
  residual net without normalization, would wipe them out even at 1% of its
  norm. Afterwards, step :math:`t` is in *trouble* when :math:`b_t > a_t`
  and :math:`T_t` exceeds :math:`\tau` (`trouble`) while the controller
  clips, or :math:`(1 + \tau)/2` while released (:math:`\log c_{t-1} \ge
  \mu_{t-1} + \log R`): a run that was let go asks for a clearer rise. With
  :math:`\mu_{t-1}` the mean log norm below,

  .. math::
    \log c_t = \begin{cases}
      \min\bigl(\log c_{t-1},\
                \max(\log c_{t-1} - \kappa \max(T_t, 0),\ \lambda_t)\bigr)
        & \text{trouble,} \\
      \min\bigl(\log c_{t-1} + r_t,\
                \max(\mu_{t-1} + \log R,\ \log c_{t-1})\bigr)
        & \text{otherwise,}
    \end{cases}

  with :math:`\kappa` the `cut_rate`, :math:`R` the `release`: a cut in
  proportion to the evidence, so that a clear rise (:math:`T_t = 0.5`
  for some four steps) halves :math:`c_t` and a trend that barely
  crosses :math:`\tau` in noise takes less off than a few steps of
  recovery give back. The growth is
  :math:`r_t = \operatorname{clip}(\tfrac12 - T_t, 0, 1) \log` `slow_start`
  until the first trouble (half rate on a flat trend, full rate while the
  loss falls fast) and :math:`r_t = \log` `recovery` after, or
  :math:`r_t = 0` on a step whose estimate is not finite (a run already
  blown up does not read as falling). A cut stops at the floor
  :math:`\lambda_t = \log c_1`, where the controller started, unless the
  rise is *sustained*: the product's trend over a slow EMA (decay 0.99),
  :math:`T^{(1),\text{slow}}_t`, exceeds 0.1. Then it stops at
  :math:`\lambda_t = \min(\log c_1, \mu_{t-1} + \log \tfrac1{20})`, a
  twentieth of the (geometric) mean norm, so that a run whose norms stay
  far above the floor, or have fallen far below it, can still be cut to a
  smaller step. Finally :math:`c_t` is raised to at least
  :math:`\min(c_1, e^{\mu_{t-1}} / 20)`. Its threshold is :math:`c_t`, or
  :math:`\infty` (released) once :math:`\log c_t \ge \mu_{t-1} + \log R`.
  A released controller not in trouble then keeps
  :math:`\log c_t \ge \mu_t + \log R`: it stays released as the norms
  grow, until a clear rise.

  **The loss, when passed** (``tx.update(g, state, params, loss=loss)``, the
  keyword `skip_spikes` reads too): with :math:`F_t` the EMA of the loss with
  decay 0.9 (starting at the first loss) and :math:`N_t` an EMA (0.99,
  bias-corrected) of :math:`|L_t - L_{t-1}|`, step :math:`t` is also in
  trouble when :math:`F_t - F_{t-10} > N_t`, from the eleventh loss on: a
  rise sustained over some ten steps, which noise in the minibatch losses
  does not make, and which ends some ten steps after the loss stops rising.
  Such a step cuts as a clear rise does, with :math:`T_t` read as at least
  0.5.

  **Steps of a fixed norm.** A cut cannot shrink a step whose norm does not
  follow the updates' (Lion's sign steps move every coordinate by the
  learning rate): it only leaves the optimizer's momentum, built before the
  cut, in charge of the direction. With :math:`B^d_t` and :math:`B^n_t` the
  EMAs (decay 0.8) of the squared second differences of
  :math:`\log |d_{t-1}|_S^2` and of the log norm the updates were clipped to,
  each square read as at most 1 (:math:`B^d` starts at 0.01, :math:`B^n` at
  0), a step with :math:`B^d_t < 10^{-4}` and :math:`B^n_{t-1} > 10^{-3}` is
  not in trouble, and :math:`\log c_t` is raised to the release cap: the
  controller lets go, and only spikes are clipped; this overrides the
  passed loss too. A run whose clipped norm does not move (held at a
  constant threshold) tells nothing, and second differences let smooth
  schedules of the learning rate through (a jump of the rate holds
  :math:`B^d` above its bound for some 40 steps; a step of norm 0 restarts
  the differences). A weight decay in the step (Lion's `wd`
  :math:`\theta`) moves its norm, and a large one hides it.

  **Spikes.** With :math:`\ell_t = \mu_{t-1} + z\,\max(\sigma_{t-1}, 0.01)`
  (:math:`z` the `spike_z`; :math:`\infty` on the first step),
  :math:`x_t = \min(\log n_t, \ell_t)`,
  :math:`\mu_t = \rho\mu_{t-1} + (1-\rho)x_t` and
  :math:`\sigma_t^2 = \rho\sigma_{t-1}^2 + (1-\rho)(x_t - \mu_t)^2`
  (:math:`\rho` the `spike_decay`; :math:`\mu_1 = \log n_1`,
  :math:`\sigma_1^2 = 1`).

  The updates are clipped to global norm
  :math:`\min(c_t \text{ or } \infty,\ e^{\ell_t},\ \text{max_norm})`.

  Guarantees:

  - The metrics say when and why it clipped: ``clip_cause`` is 0 (not
    clipped), 1 (slow start), 2 (the controller, once the loss has been
    seen rising: it is cut on the steps in trouble and recovers on the
    others), 3 (a spike) or 4 (`max_norm`, where it is below the rule's
    threshold); ``loss_trend`` is :math:`T_t`. Once released,
    ``clip_threshold`` is the spike cap (or `max_norm`) and ``clip_scale``
    is 1 except on spikes.
  - No copy of the parameters: the state holds its five metrics, one
    float32 vector of 41 statistics and one array of the subset of
    coordinates of the last parameters, updates and step (about
    `coordinates` entries each; a leaf with short dimensions, such as a
    convolution's 3 x 3, keeps more): seven arrays, so that on a GPU
    writing the state takes few kernels. Under GSPMD sharding (explicit
    mesh axes too) the subset alone is gathered, never a leaf; under
    `axis_name` each device packs the subset of its own shards (its own
    `subset`, while every other field is the same on every device) and the
    dot products are summed over the axis like the norm.
  - A step whose updates are not finite leaves every statistic, the subset
    buffers included, bit-identical, and its updates pass through
    unchanged. So does a step whose norm is 0 (a batch masked out), and a
    step of finite updates whose norm overflows float32, whose updates are
    clipped to the threshold in force (on the first step, where there is
    none yet, to `max_norm` if given). A step whose loss estimate is not
    finite changes no trend statistic.
  - The loss is optional and can only add trouble (cuts),
    never release the threshold; a loss that is not finite changes nothing.
    Other extra arguments are ignored.
  - ``tx.update(updates, state)`` without `params` degrades gracefully:
    there is no loss estimate (:math:`T_t = 0`), so the rule is its slow
    start at the full rate :math:`r_t = \log` `slow_start`, then release
    with spike clipping. `params` must otherwise have the leaves and shapes
    of the updates (ValueError); after a step without them, the estimate
    waits for two steps with them.
  - A step that leaves the parameters in place (on the subset) makes no
    step to read: the estimate, and the threshold's growth and cuts by it
    or by the loss, wait for the next step that moves them, which is read
    against the mean of the gradients since the last one (for up to 64
    calls; after that each call reads as a step of no change). So
    ``optax.chain(adaptive(), optax.MultiSteps(opt, k))`` reads each step
    of the accumulated gradient much as ``optax.MultiSteps(optax.chain(
    adaptive(), opt), k)`` does, while clipping each micro-batch's
    gradient; the spike statistics, the loss watch, the slope at the
    step's end (:math:`b_t`) and the product of consecutive gradients in
    the noise estimates (both from the first gradient after the step)
    still read single micro-batches. A step skipped after `adaptive()` is read
    as none, but its gradient joins the mean the next step is read
    against.

  Args:
    start: :math:`s` in (0, 1], the first threshold as a fraction of the
      first norm (at most twice the parameters' norm).
    slow_start: The growth factor per step (finite, >= 1) before the first
      trouble, at :math:`T_t = -1`.
    recovery: The growth factor per step (finite, >= 1) after the first
      trouble.
    cut_rate: :math:`\kappa` >= 0, finite: each step in trouble lowers
      :math:`\log c_t` by :math:`\kappa` times the trend.
    trouble: :math:`\tau` in [-1, 1], the trend above which a rise of the
      loss is trouble.
    trend_decay: :math:`\beta` in (0, 1).
    release: :math:`R` >= 1: released when :math:`c_t` exceeds :math:`R`
      times the mean norm (geometric).
    spike_z: :math:`z` > 0, the z-score of the log norm that is a spike.
    spike_decay: :math:`\rho` in (0, 1).
    coordinates: Structural: about how many coordinates the loss estimate
      reads, at least one per leaf (an int >= 1; it fixes the shapes of the
      state, so with `optax.inject_hyperparams` list it in `static_args`).
    max_norm: Optional absolute ceiling on the threshold, a non-negative
      number.
    axis_name: Mapped axis name(s) over which the norm and the loss estimate
      are global under `shard_map`/`pmap`; see :func:`global_norm`.
    name: If given, the metrics are reported as ``"<name>/<metric>"``.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` with state
    `AdaptiveState`; its metrics add ``clip_cause`` and ``loss_trend``.

  Raises:
    ValueError: If an argument is outside its range, or at update time if
      `params` does not match the updates or ``loss`` is not a scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_clipkit as clipkit
    >>> tx = optax.chain(clipkit.adaptive(), optax.sgd(1e-2, momentum=0.9))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([30.0, 40.0, 0.0])}
    >>> updates, state = tx.update(grads, state, params)  # Pass params.
    >>> m = clipkit.metrics(state)
    >>> round(float(m["clip_threshold"]), 4), float(m["clip_cause"])
    (0.5, 1.0)

  References:
    Battiti, `Accelerated backpropagation learning: two optimization
    methods <https://www.complex-systems.com/abstracts/v03_i04_a02/>`_, 1989
    (the bold driver); Kumar et al., `ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training <https://arxiv.org/abs/2504.02507>`_, 2025
  """
  _validation.check_number("start", start, low=0.0, high=1.0, low_open=True,
                           expected="a number in (0, 1]")
  _validation.check_number("cut_rate", cut_rate, low=0.0, high=math.inf,
                           high_open=True,
                           expected="a finite non-negative number")
  for arg, value in (("slow_start", slow_start), ("recovery", recovery)):
    _validation.check_number(arg, value, low=1.0, high=math.inf,
                             high_open=True, expected="a finite number >= 1")
  _validation.check_number("release", release, low=1.0,
                           expected="a number >= 1")
  _validation.check_number("trouble", trouble, low=-1.0, high=1.0,
                           expected="a number in [-1, 1]")
  for arg, value in (("trend_decay", trend_decay),
                      ("spike_decay", spike_decay)):
    _validation.check_number(arg, value, low=0.0, high=1.0, low_open=True,
                             high_open=True, expected="a number in (0, 1)")
  _validation.check_number("spike_z", spike_z, low=0.0, low_open=True,
                           expected="a positive number")
  n_coords = _validation.check_int("coordinates", coordinates, low=1)
  _validation.check_optional_threshold("max_norm", max_norm)

  def init_fn(params):
    _validation.check_float_leaves(params)
    leaves = jax.tree.leaves(params)
    # `* 0` rather than new zeros: the subset is built as updates build
    # it, so that the state keeps the sharding that updates give it.
    zeros = _subset(leaves, n_coords).pack(leaves) * 0
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    stats, subset = _pack(dict(
        log_threshold=jnp.inf,
        log_floor=-jnp.inf,
        norm_mean=0.0,
        norm_var=0.0,
        recovering=0.0,
        norm_count=0,
        estimate_count=0,
        grad_count=0,
        trend_sums=jnp.zeros((2, 2)),
        slow_sums=jnp.zeros((2,)),
        step_dots=jnp.zeros((4,)),
        step_bends=jnp.array([0.0, 0.0, 0.0, _BEND_START]),
        norm_bends=jnp.zeros((4,)),
        loss_stats=jnp.concatenate([
            jnp.array([jnp.nan, 0.0, 0.0, 0.0]),
            jnp.zeros((_LAG + 1,))]),
        prev_params=zeros,
        prev_grads=zeros,
        prev_step=zeros,
    ))
    return AdaptiveState(
        *_global_norm.init_norm_metrics(jnp.inf),
        clip_cause=f32(NONE),
        loss_trend=f32(0.0),
        stats=stats,
        subset=subset,
    )

  def update_fn(updates, state, params=None, *, loss=None, **extra_args):
    del extra_args  # Meant for other transformations of a chain.
    if loss is not None and jnp.ndim(loss) != 0:
      raise ValueError(
          f"`loss` must be a scalar, got an array of shape {jnp.shape(loss)}.")
    leaves = jax.tree.leaves(updates)
    coords = _subset(leaves, n_coords)
    g_sub = coords.pack(leaves)
    if state.stats.shape[-1] != _N_STATS:
      raise ValueError(
          f"`state` holds {state.stats.shape[-1]} statistics, where this"
          f" version of `adaptive` keeps {_N_STATS}: it was made by another"
          " version (a checkpoint of an older state does not resume).")
    if state.subset.shape[-1] != g_sub.shape[0]:
      raise ValueError(
          f"`state` holds a subset of {state.subset.shape[-1]} coordinates,"
          f" but these updates give {g_sub.shape[0]}: it was made by `init`"
          " for another tree (under `shard_map`, `init` must run inside it,"
          " on the local shards, as `update` does).")
    p_sub = None
    if params is not None:
      _check_params(params, updates)
      p_leaves = jax.tree.leaves(params)
      p_sub = coords.pack(p_leaves)
    f = _numerics.as_f32

    def dots(xs, ys):
      # All the products in one reduction (and one psum): on a GPU each
      # reduction is a kernel launch.
      total = jnp.sum(
          coords.weights[None] * jnp.stack(xs) * jnp.stack(ys), axis=1)
      return total if axis_name is None else jax.lax.psum(total, axis_name)

    def rule(norm, stats):
      (log_c, floor, mean, var, sums, slow, recovering, watch, count,
       in_row, grad_count, prev_p, prev_g, prev_d, step_dots, step_bends,
       norm_bends) = (stats[k] for k in (
           "log_threshold", "log_floor", "norm_mean", "norm_var",
           "trend_sums", "slow_sums", "recovering", "loss_stats",
           "norm_count", "estimate_count", "grad_count", "prev_params",
           "prev_grads", "prev_step", "step_dots", "step_bends",
           "norm_bends"))
      log_n = jnp.log(jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
      first = count == 0
      # The estimated change of the loss over the last step, and its trend.
      if p_sub is None:
        seen = jnp.zeros((), bool)
        a, b = jnp.zeros((2,), jnp.float32), jnp.zeros((), jnp.float32)
        d, new_dots, g_d1 = prev_d, step_dots, step_dots[0]
        log_theta = jnp.inf
        new_bends = _bend(0.0, step_bends, False)
        moved, held = jnp.ones((), bool), jnp.zeros((), bool)
      else:
        d = p_sub - prev_p
        ga, b, gg, d1d1, g1g1, dd1, theta_sq, dd, g_d1 = dots(
            [prev_g, g_sub, g_sub, prev_d, prev_g, d, p_sub, d, g_sub],
            [d, d, prev_g, prev_d, prev_g, prev_d, p_sub, d, prev_d])
        # Parameters left in place make no step to read (see `_MAX_HOLD`).
        held = (in_row > 0) & ~(dd > 0)
        moved = ~held | (grad_count >= _MAX_HOLD)
        # The parameters' norm, for the first threshold (none if zero).
        log_theta = jnp.where((theta_sq > 0) & jnp.isfinite(theta_sq),
                              0.5 * jnp.log(theta_sq), jnp.inf)
        # The last step's squared norm, for a step of a fixed norm.
        log_d1 = jnp.log(jnp.where(d1d1 > 0, d1d1, 1.0))
        new_bends = _bend(log_d1, step_bends,
                          (in_row >= 2) & (d1d1 > 0) & jnp.isfinite(log_d1))
        new_bends = jnp.where(moved, new_bends, step_bends)
        a = -ga  # The first-order decrease the step promised.
        # b: the slope along the step where it ended.
        new_dots = jnp.stack([b, gg, ga, g1g1])
        # One estimate per noise estimate: the trend is the lower of the two.
        a = a - _self_noise(a, d1d1, g1g1, dd1, step_dots, in_row >= 2)
        seen = ((in_row > 0) & moved & jnp.all(jnp.isfinite(a))
                & jnp.isfinite(b))
        a, b = jnp.where(seen, a, 0.0), jnp.where(seen, b, 0.0)
      beta = f(trend_decay)
      rise, size = b - a, jnp.abs(a) + jnp.abs(b)
      new_sums = beta * sums + (1 - beta) * jnp.stack([rise, size])
      # The slow EMAs, of the product's estimate alone: see the floor below.
      new_slow = (_SUSTAINED_DECAY * slow
                  + (1 - _SUSTAINED_DECAY) * jnp.stack([rise[0], size[0]]))
      # Finite products can still overflow the sums, in a run already blown
      # up: such a step is not seen either.
      seen &= jnp.all(jnp.isfinite(new_sums)) & jnp.all(jnp.isfinite(new_slow))
      sums = jnp.where(seen, new_sums, sums)
      slow = jnp.where(seen, new_slow, slow)
      # Each noise estimate errs toward a rise in its own regime (see
      # `_self_noise`): the trend is the lower of the two, and a step's own
      # rise is read with the same estimate.
      trends = _ratio(sums)
      pick = jnp.argmin(trends)
      trend, rise = trends[pick], rise[pick]
      # Once released, a rise must be clearer to re-engage: halfway to 1.
      cap = mean + jnp.log(f(release))  # Released at or above it.
      was_released = (count > 0) & (log_c >= cap)
      level = jnp.where(was_released, (1 + f(trouble)) / 2, f(trouble))
      hurt = seen & (trend > level) & (rise > 0)
      if loss is not None:
        rising, watch = _watch(f(loss), watch)
        hurt |= rising & moved  # Once a step, under accumulation.
      # A step of a fixed norm (see `_FIXED_STEP`) is never cut: the
      # controller lets go, and only spikes are clipped.
      fixed = (new_bends[3] < _FIXED_STEP) & (norm_bends[3] > _VARIED_NORM)
      hurt &= ~fixed
      # The controller: in trouble, cut in proportion to the evidence (the
      # trend; a sustained rise of the passed loss reads as a clear one);
      # otherwise grow (faster the faster the loss falls), up to the release
      # cap, and once released follow that cap up as the norms grow: a run
      # let go stays let go (the norms of a healthy run can grow for
      # hundreds of steps).
      evidence = jnp.maximum(trend, 0.0)
      if loss is not None:
        evidence = jnp.where(rising, jnp.maximum(evidence, _CLEAR), evidence)
      # Without params there is no estimate: the slow start runs at full
      # rate. With them, it runs at half rate on a flat trend, and nothing
      # grows on a step the estimate could not read.
      speed = 1.0 if p_sub is None else jnp.clip(0.5 - trend, 0.0, 1.0)
      grow = jnp.where(recovering > 0, jnp.log(f(recovery)),
                       jnp.log(f(slow_start)) * speed)
      if p_sub is not None:
        grow = jnp.where(first | seen, grow, 0.0)
      # Spikes: a z-score on the log norm; statistics of capped norms.
      log_spike = jnp.where(
          first, jnp.inf,
          mean + f(spike_z) * jnp.sqrt(jnp.maximum(var, _VAR_FLOOR)))
      kept = jnp.minimum(log_n, log_spike)
      rho = f(spike_decay)
      new_mean = jnp.where(first, log_n, rho * mean + (1 - rho) * kept)
      new_var = jnp.where(first, 1.0,
                          rho * var + (1 - rho) * jnp.square(kept - new_mean))
      # The floor, where it started, stops cuts unless the rise is
      # sustained: then they may go on down to `_BELOW` times the mean norm.
      # Sustained by the product's reading, the one that errs toward a rise:
      # with the lower one, SGD runs whose norms fall far below the floor
      # were held at it.
      # It starts at `start` times the norm, or at most `_PARAM_CAP` times
      # the parameters' norm.
      floor = jnp.where(first, jnp.minimum(log_n + jnp.log(f(start)),
                                           log_theta + math.log(_PARAM_CAP)),
                        floor)
      low = jnp.minimum(floor, mean + math.log(_BELOW))
      cut_to = jnp.minimum(log_c, jnp.maximum(  # A cut never raises.
          log_c - f(cut_rate) * evidence,
          jnp.where(_ratio(slow) > _SUSTAINED, low, floor)))
      grown = jnp.where(
          was_released, jnp.maximum(log_c, new_mean + jnp.log(f(release))),
          jnp.minimum(log_c + grow, jnp.maximum(cap, log_c)))
      log_c = jnp.where(hurt, cut_to, grown)
      log_c = jnp.where(first, floor, jnp.maximum(log_c, low))
      log_c = jnp.where(fixed & ~first, jnp.maximum(log_c, cap), log_c)
      released = ~first & (log_c >= cap)
      controller = jnp.where(released, jnp.inf, jnp.exp(log_c))
      recovering = jnp.where(hurt, 1.0, recovering)
      spike = jnp.exp(log_spike)
      threshold = jnp.minimum(controller, spike)
      # The log norm the updates are clipped to, for a step of a fixed norm.
      applied = jnp.minimum(
          log_n, jnp.log(_history.ceiling(threshold, max_norm)))
      norm_bends = _bend(applied, norm_bends, jnp.isfinite(applied))
      # Why a norm above the threshold is clipped.
      why = jnp.where(spike < controller, SPIKE,
                      jnp.where(recovering > 0, OVERSHOOT, START))
      # While the parameters wait, the gradients and the last step's slope
      # along them are averaged: the fit of eta reads that step against
      # their mean.
      def averaged(old, x):
        return old + (x - old) / (grad_count + 1)

      new = dict(
          log_threshold=log_c, log_floor=floor, norm_mean=new_mean,
          norm_var=new_var, trend_sums=sums, slow_sums=slow,
          recovering=recovering, loss_stats=watch,
          norm_count=jnp.minimum(count + 1, 2),
          estimate_count=(0 if p_sub is None else
                          jnp.where(moved, jnp.minimum(in_row + 1, 2), in_row)),
          grad_count=jnp.where(held, jnp.minimum(grad_count + 1, _MAX_HOLD),
                               1.0),
          prev_params=prev_p if p_sub is None else p_sub,
          prev_grads=jnp.where(moved, g_sub, averaged(prev_g, g_sub)),
          prev_step=jnp.where(moved, d, prev_d),
          step_dots=jnp.where(moved, new_dots, jnp.asarray(step_dots).at[0].set(
              averaged(step_dots[0], g_d1))),
          step_bends=new_bends, norm_bends=norm_bends)
      return threshold, new, why, trend

    norm = _numerics.global_norm(leaves, axis_name)
    value = f(norm.value)
    # The statistics read only a finite, non-zero norm: a zero norm (say, a
    # batch masked out) carries no scale, and its log would swamp them.
    seen = jnp.isfinite(value) & (value > 0)
    old = _unpack(state.stats, state.subset)
    threshold, new, why, trend = rule(jnp.where(seen, value, 1.0), old)
    # Before the first norm seen there is no threshold (for other steps the
    # rule's threshold does not depend on this step's norm).
    threshold = jnp.where(seen | (old["norm_count"] > 0), threshold, jnp.inf)
    capped = _history.ceiling(threshold, max_norm)
    # Finite updates whose norm overflows float32 are clipped too; updates
    # that are not finite pass through (`scale.clipped` is false).
    updates, _, scale = _global_norm.clip_global(updates, capped, norm)
    # `max_norm` is the cause wherever it binds, below the rule's threshold.
    cause = jnp.where(scale.clipped,
                      jnp.where(capped < threshold, CEILING, why), NONE)
    stats, subset = _history.keep_if_finite(
        seen, _pack(new), (state.stats, state.subset))
    return updates, AdaptiveState(
        value, f(capped), f(scale.applied), f(cause),
        jnp.where(seen, trend, state.loss_trend), stats, subset)

  return _metrics.named(
      optax.GradientTransformationExtraArgs(init_fn, update_fn), name)
