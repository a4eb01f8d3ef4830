"""skip_spikes against a numpy reference of the rule, and in training loops."""

import math

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_clipkit as clipkit


def reference(norms, losses, sigma, window, warmup):
  """The skip rule, written independently: lists, float64, np.std(ddof=1)."""
  norm_win, loss_win, skips = [], [], []
  for i, n in enumerate(norms):
    l = None if losses is None else losses[i]

    def spike(v, win):
      if len(win) < warmup:
        return False
      return v > np.mean(win) + sigma * np.std(win, ddof=1)

    finite = math.isfinite(n) and (l is None or math.isfinite(l))
    skip = (not finite) or spike(n, norm_win) or (
        l is not None and spike(l, loss_win))
    if finite:
      norm_win = (norm_win + [n])[-window:]
      if l is not None:
        loss_win = (loss_win + [l])[-window:]
    skips.append(skip)
  return np.array(skips)


def sequence(steps=300, seed=0):
  """Norms and losses with noise, spikes, NaN/inf steps and a level shift."""
  rng = np.random.default_rng(seed)
  norms = 1.0 + 0.05 * rng.standard_normal(steps)
  losses = 3.0 - np.linspace(0, 1, steps) + 0.02 * rng.standard_normal(steps)
  norms[200:] += 2.0  # A level shift: it must be accepted after a few skips.
  for i in (70, 71, 130, 250):
    norms[i] *= 20.0
  for i in (90, 160):
    losses[i] += 5.0  # Loss spikes with an ordinary norm.
  norms[110] = np.nan
  norms[140] = np.inf
  losses[180] = np.nan
  return norms, losses


def run(tx, norms, losses=None):
  """Runs `tx` in a scan on one-element gradients of the given norms."""
  params = {"w": jnp.zeros(1)}

  def body(state, x):
    g = {"w": jnp.reshape(x[0], (1,))}
    extra = {} if losses is None else {"loss": x[1]}
    updates, state = tx.update(g, state, params, **extra)
    return state, (updates["w"][0], clipkit.metrics(state))

  xs = jnp.stack([jnp.asarray(norms, jnp.float32),
                  jnp.asarray(norms if losses is None else losses,
                              jnp.float32)], axis=1)
  state, (updates, logged) = jax.jit(
      lambda s, xs: jax.lax.scan(body, s, xs))(tx.init(params), xs)
  return state, np.asarray(updates), {k: np.asarray(v) for k, v in logged.items()}


@pytest.mark.parametrize("with_loss", [False, True])
@pytest.mark.parametrize("sigma,window,warmup", [(6.0, 128, None), (3.0, 32, 8)])
def test_matches_numpy_reference(with_loss, sigma, window, warmup):
  norms, losses = sequence()
  losses = losses if with_loss else None
  tx = clipkit.skip_spikes(optax.sgd(1.0), sigma=sigma, window=window,
                           warmup=warmup)
  state, updates, logged = run(tx, norms, losses)
  want = reference(norms, losses, sigma, window,
                   max(2, window // 2) if warmup is None else warmup)
  np.testing.assert_array_equal(logged["skipped"].astype(bool), want)
  assert int(state.skip_count) == want.sum()
  # Every spike and non-finite step was caught, and the shift accepted.
  assert want[[70, 71, 110, 130, 140, 250]].all()
  assert not want[205:250].any()
  if with_loss:
    assert want[[90, 160, 180]].all()
  # Skipped steps give zeros; the others are -g.
  np.testing.assert_array_equal(updates[want], 0.0)
  np.testing.assert_allclose(updates[~want], -norms[~want], rtol=1e-6)
  # This step's norm is reported, skipped or not.
  np.testing.assert_allclose(logged["skip_grad_norm"], np.abs(norms),
                             rtol=1e-6)


@pytest.mark.parametrize("sigma", [6.0, 3.0, 2.0])
def test_level_shift_accepted_after_the_documented_number_of_skips(sigma):
  window = 128
  norms = np.concatenate([np.ones(window), 2.0 * np.ones(40)])
  _, _, logged = run(clipkit.skip_spikes(optax.sgd(1.0), sigma=sigma), norms)
  skipped = logged["skipped"].astype(bool)
  assert not skipped[:window].any()
  k = math.ceil(window * (window - 1) / (sigma**2 * window + window - 1))
  # The first k steps at the new level are skipped, all later ones taken.
  np.testing.assert_array_equal(skipped[window:], np.arange(40) < k)
  if sigma == 6.0:
    assert k == 4  # The figure the docstring states for the defaults.


def test_nonfinite_steps_leave_the_statistics_alone():
  tx = clipkit.skip_spikes(optax.sgd(1.0), window=4)
  norms = [1.0, 2.0, 3.0, np.nan, 4.0]
  state, updates, logged = run(tx, norms)
  assert logged["skipped"].tolist() == [0, 0, 0, 1, 0]
  assert np.isnan(logged["skip_grad_norm"][3])  # The bad step stays visible.
  np.testing.assert_allclose(logged["skip_norm_mean"][3:], [2.0, 2.0])
  np.testing.assert_allclose(np.sort(state.norm_window), [1, 2, 3, 4])
  assert np.isfinite(updates).all()  # A NaN step's updates are zeros.


def adamw_inner():
  return optax.chain(clipkit.global_norm(1.0),
                     optax.adamw(1e-2, weight_decay=0.1))


@pytest.fixture
def standard_promotion():
  """optax.adamw itself mixes int and float dtypes."""
  with jax.numpy_dtype_promotion("standard"):
    yield


@pytest.mark.usefixtures("standard_promotion")
def test_inner_state_is_bit_identical_on_skipped_steps(code_path):
  tx = clipkit.skip_spikes(adamw_inner(), window=8, warmup=4)
  params = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones(2)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  skipped = 0
  for i in range(20):
    g = jax.tree.map(lambda p: jnp.asarray(
        rng.standard_normal(p.shape), jnp.float32), params)
    if i in (6, 16):
      g = jax.tree.map(lambda x: 100.0 * x, g)
    if i == 12:
      g["b"] = g["b"].at[0].set(jnp.nan)
    before = state.inner_state
    updates, state = step(g, state, params, loss=jnp.float32(1.0))
    if bool(state.skipped):
      skipped += 1
      chex.assert_trees_all_equal(state.inner_state, before, strict=True)
      chex.assert_trees_all_equal(
          updates, jax.tree.map(jnp.zeros_like, params), strict=True)
    else:
      assert not np.array_equal(state.inner_state[1][0].mu["w"],
                                before[1][0].mu["w"])
    params = optax.apply_updates(params, updates)
  assert skipped == 3 and int(state.skip_count) == 3


class _Recorder:
  """An inner transformation that records the extra arguments it gets."""

  def __init__(self):
    self.seen = []

  def tx(self):
    def update(updates, state, params=None, **extra):
      self.seen.append(sorted(extra))
      return updates, state
    return optax.GradientTransformationExtraArgs(
        lambda p: optax.EmptyState(), update)


def test_loss_extra_arg_is_judged_and_passed_on(code_path):
  rec = _Recorder()
  tx = clipkit.skip_spikes(rec.tx(), window=4)
  g = {"w": jnp.ones(2)}
  state = tx.init(g)
  for loss in (1.0, 1.1, 0.9, 1.0):
    _, state = tx.update(g, state, g, loss=jnp.float32(loss), other=1)
  assert not bool(state.skipped)
  # A loss spike alone, with an ordinary gradient norm, is skipped.
  out, state = tx.update(g, state, g, loss=jnp.float32(9.0), other=1)
  assert bool(state.skipped) and float(state.skip_loss) == 9.0
  chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, g))
  assert rec.seen[-1] == ["loss", "other"]
  m = clipkit.metrics(state)
  np.testing.assert_allclose(m["skip_loss_mean"], 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="`loss` must be a scalar"):
    tx.update(g, state, g, loss=jnp.ones(2))


def test_multisteps_judges_the_accumulated_step(code_path):
  tx = optax.MultiSteps(
      clipkit.skip_spikes(optax.sgd(1.0), window=4), every_k_schedule=2)
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  # Accumulated steps of norm 1, then one whose mean is 10.5: skipped.
  micro = [1.0, 1.0] * 4 + [1.0, 20.0] + [1.0, 1.0]
  outs = []
  with jax.numpy_dtype_promotion("standard"):  # MultiSteps mixes dtypes.
    for g in micro:
      out, state = step({"w": jnp.array([g])}, state, params,
                        loss=jnp.float32(1.0))
      outs.append(float(out["w"][0]))
  inner = state.inner_opt_state
  assert int(inner.skip_count) == 1
  # The window holds accumulated norms only: 4 steps of 1, one of 10.5, 1.
  np.testing.assert_allclose(np.sort(inner.norm_window), [1, 1, 1, 10.5])
  assert outs[9] == 0.0 and outs[11] == -1.0


def test_inject_hyperparams_traces_sigma():
  factory = lambda sigma: clipkit.skip_spikes(optax.sgd(1.0), sigma=sigma,
                                              window=8)
  tx = optax.inject_hyperparams(factory)(sigma=6.0)
  norms = [1.0, 1.1, 0.9, 1.0, 1.4]
  _, _, logged = run(tx, norms)
  assert logged["skipped"][-1] == 0
  state = tx.init({"w": jnp.zeros(1)})
  state.hyperparams["sigma"] = jnp.float32(1.0)  # A tighter rule: skipped.
  params = {"w": jnp.zeros(1)}
  for g in norms:
    _, state = jax.jit(tx.update)({"w": jnp.array([g])}, state, params)
  assert bool(state.inner_state.skipped)


@pytest.mark.usefixtures("standard_promotion")
def test_sharded_gradients_and_axis_name():
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  params = {"w": jnp.ones((64, 32)), "b": jnp.ones((32,))}
  shardings = {"w": NamedSharding(mesh, P("data", "model")),
               "b": NamedSharding(mesh, P("model"))}
  tx = clipkit.skip_spikes(adamw_inner(), window=4)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(
      (30.0 if i == 5 else 1.0) * rng.standard_normal(p.shape), jnp.float32),
                        params) for i in range(6)]
  step = jax.jit(tx.update)
  s_sharded = s_plain = tx.init(params)
  for g in grads:
    out, s_sharded = step(jax.device_put(g, shardings), s_sharded, params)
    ref, s_plain = tx.update(g, s_plain, params)
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-7)
    for k in g:
      assert out[k].sharding.is_equivalent_to(shardings[k], out[k].ndim)
  assert bool(s_sharded.skipped) and bool(s_plain.skipped)
  hlo = step.lower(jax.device_put(grads[0], shardings), s_sharded,
                   params).compile().as_text()
  assert "all-gather" not in hlo

  # Under shard_map each device sees a shard; axis_name makes the norm global.
  tx = clipkit.skip_spikes(optax.sgd(1.0), window=4, axis_name="data")
  g = {"w": jnp.arange(8.0).reshape(8, 1)}

  def local(g, s):
    _, s = tx.update(g, s, None)
    return s.skip_grad_norm

  f = jax.shard_map(local, mesh=Mesh(np.array(jax.devices()), ("data",)),
                    in_specs=(P("data"), P()), out_specs=P())
  np.testing.assert_allclose(f(g, tx.init(g)), np.linalg.norm(np.arange(8.0)),
                             rtol=1e-6)


@pytest.mark.usefixtures("standard_promotion")
def test_checkpoint_round_trip():
  tx = clipkit.skip_spikes(adamw_inner(), window=8, name="guard")
  params = {"w": jnp.ones(4)}
  seq = [{"w": jnp.full(4, g, jnp.float32)} for g in
         (1.0, 1.2, 0.8, 1.1, 0.9, 40.0, 1.0, 1.05)]
  state = tx.init(params)
  for g in seq[:6]:
    _, state = tx.update(g, state, params, loss=jnp.float32(2.0))
  restored = flax.serialization.from_bytes(
      tx.init(params), flax.serialization.to_bytes(state))
  chex.assert_trees_all_equal(restored, state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert clipkit.metrics(restored).keys() == clipkit.metrics(state).keys()
  for g in seq[6:]:
    a, state = tx.update(g, state, params, loss=jnp.float32(2.0))
    b, restored = tx.update(g, restored, params, loss=jnp.float32(2.0))
    chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(restored, state)


def test_validation():
  with pytest.raises(ValueError, match="`sigma` must be a positive number"):
    clipkit.skip_spikes(optax.sgd(1.0), sigma=0.0)
  with pytest.raises(ValueError, match="`window` must be an integer >= 2"):
    clipkit.skip_spikes(optax.sgd(1.0), window=1)
  with pytest.raises(ValueError, match=r"`warmup` must be an integer in \[2"):
    clipkit.skip_spikes(optax.sgd(1.0), window=8, warmup=9)
  with pytest.raises(ValueError, match="`warmup` must be an integer >= 2"):
    clipkit.skip_spikes(optax.sgd(1.0), warmup=1)
  with pytest.raises(TypeError, match="`inner` must be an optax"):
    clipkit.skip_spikes(lambda g: g)
  with pytest.raises(ValueError, match="`name` must be a non-empty string"):
    clipkit.skip_spikes(optax.sgd(1.0), name="")
