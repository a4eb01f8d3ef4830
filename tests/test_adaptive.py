"""adaptive, autoclip and zclip against independent numpy references."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_clipkit as clipkit
from benchmarks import tasks


def norm_sequence(seed, steps, bad=()):
  """Gradients whose global norms drift over decades, with noise and spikes.

  The log-norm follows a slow wave of +-2 decades plus noise of +-0.5; every
  ninth step after step 25 is a spike of 1e4 times. Steps listed in `bad`
  hold a NaN or an inf.
  """
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    g = {"a": rng.standard_normal(5).astype(np.float32),
         "b": [rng.standard_normal((2, 3)).astype(np.float32)]}
    log_scale = 2 * np.sin(t / 30) + rng.uniform(-0.5, 0.5)
    spike = 1e4 if t % 9 == 8 and t > 25 else 1.0
    scale = np.float32(10.0**log_scale * spike)
    g = jax.tree.map(lambda x, s=scale: x * s, g)
    if t in bad:
      g["a"][t % 5] = np.nan if t % 2 else np.inf
    out.append(g)
  return out


def np_norm(g):
  return float(np.sqrt(sum(np.sum(np.square(x.astype(np.float64)))
                           for x in jax.tree.leaves(g))))


def run(tx, seq, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(seq[0])
  outs, states = [], []
  for g in seq:
    u, state = update(g, state)
    outs.append(u)
    states.append(state)
  return outs, states


def check_clipped_to(g, u, threshold):
  """`u` is `g` clipped to global norm `threshold` (numpy reference)."""
  n = np_norm(g)
  scale = 1.0 if not np.isfinite(n) or n <= threshold else threshold / n
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(u)):
    if np.isfinite(n):
      np.testing.assert_allclose(y, x * scale, rtol=2e-5, atol=1e-30)
    else:  # Non-finite input passes through unchanged.
      np.testing.assert_array_equal(y, x)


def autoclip_reference(norms, p, history, max_norm):
  """Algorithm 1 of the AutoClip paper, with a window of `history` norms."""
  kept, out = [], []
  for n in norms:
    if np.isfinite(n):
      kept = (kept + [n])[-history:]
    t = np.percentile(kept, p) if kept else np.inf
    out.append(t if max_norm is None else min(t, max_norm))
  return out


@pytest.mark.parametrize("p,history,max_norm,jit", [
    (10.0, 1000, None, True),
    (50.0, 4, None, True),
    (0.0, 3, 2.0, False),
    (100.0, 7, None, True),
    (37.5, 5, 0.5, True),
])
def test_autoclip_matches_paper(p, history, max_norm, jit):
  # Eager runs op by op: a shorter sequence keeps them quick.
  seq = norm_sequence(0, 300 if jit else 60, bad=(3, 8, 150))
  outs, states = run(clipkit.autoclip(p, history, max_norm=max_norm), seq, jit)
  norms = [np_norm(g) for g in seq]
  expected = autoclip_reference(norms, p, history, max_norm)
  for g, u, s, t in zip(seq, outs, states, expected):
    np.testing.assert_allclose(s.clip_threshold, t, rtol=1e-5)
    check_clipped_to(g, u, t)
  # Step 1 is never clipped unless max_norm applies.
  if max_norm is None:
    np.testing.assert_array_equal(outs[0]["a"], seq[0]["a"])


class ZClipReference:
  """ZClip as in the reference code (bluorion-com/ZClip), in numpy."""

  def __init__(self, z_thresh, alpha, warmup, eps, max_norm):
    self.z_thresh, self.alpha, self.warmup = z_thresh, alpha, warmup
    self.eps, self.max_norm = eps, max_norm
    self.buffer, self.mean, self.var = [], None, None

  def step(self, n):
    """Returns the norm the gradients are clipped to."""
    ceiling = np.inf if self.max_norm is None else self.max_norm
    if not np.isfinite(n):
      return np.inf
    if self.mean is None:
      self.buffer.append(n)
      if len(self.buffer) >= self.warmup:
        self.mean = np.mean(self.buffer)
        self.var = np.mean((np.array(self.buffer) - self.mean) ** 2)
      return ceiling
    std = self.var ** 0.5
    z = (n - self.mean) / (std + self.eps)
    target, limit = n, np.inf
    if z > self.z_thresh:
      eta = z / self.z_thresh
      target = limit = self.mean + self.z_thresh * std / eta
    self.mean = self.alpha * self.mean + (1 - self.alpha) * target
    self.var = (self.alpha * self.var
                + (1 - self.alpha) * (target - self.mean) ** 2)
    return min(limit, ceiling)


@pytest.mark.parametrize("z,decay,warmup,max_norm,jit", [
    (2.5, 0.97, 25, None, True),
    (1.0, 0.9, 3, None, True),
    (0.5, 0.5, 1, 3.0, False),
    (2.0, 0.8, 5, 0.1, True),
])
def test_zclip_matches_reference_code(z, decay, warmup, max_norm, jit):
  seq = norm_sequence(1, 300 if jit else 60, bad=(2, 11, 30, 200))
  tx = clipkit.zclip(z, decay, warmup, max_norm=max_norm)
  outs, states = run(tx, seq, jit)
  ref = ZClipReference(z, decay, warmup, 1e-6, max_norm)
  clipped = 0
  for g, u, s in zip(seq, outs, states):
    t = ref.step(np_norm(g))
    check_clipped_to(g, u, t)
    clipped += np_norm(g) > t
    if ref.mean is not None:
      np.testing.assert_allclose(s.norm_mean, ref.mean, rtol=1e-5)
      np.testing.assert_allclose(s.norm_std, ref.var ** 0.5, rtol=1e-4,
                                 atol=1e-6 * ref.mean)
  assert clipped > 0  # The sequence does exercise the clipping.


def adaptive_reference(norms, p, history, growth, scale, max_norm):
  kept, out, level = [], [], np.inf
  for n in norms:
    if np.isfinite(n):
      kept = (kept + [min(n, level * (1 + growth))])[-history:]
      level = np.percentile(kept, p)
    t = scale * level if kept else np.inf
    out.append(t if max_norm is None else min(t, max_norm))
  return out


@pytest.mark.parametrize("p,history,growth,scale,max_norm", [
    (50.0, 100, 0.01, 0.1, None),
    (10.0, 5, 0.1, 1.0, 1.0),
    (90.0, 3, 0.0, 0.5, 20.0),
])
def test_adaptive_matches_reference(p, history, growth, scale, max_norm):
  seq = norm_sequence(2, 300, bad=(0, 5, 100))
  tx = clipkit.adaptive(p, history, growth=growth, scale=scale,
                        max_norm=max_norm)
  outs, states = run(tx, seq)
  expected = adaptive_reference([np_norm(g) for g in seq], p, history, growth,
                                scale, max_norm)
  for g, u, s, t in zip(seq, outs, states, expected):
    np.testing.assert_allclose(s.clip_threshold, t, rtol=1e-5)
    check_clipped_to(g, u, t)


STATS = {  # strategy -> its state fields that are statistics, not metrics
    "adaptive": (clipkit.adaptive,
                 ("norm_history", "norm_count", "norm_level")),
    "autoclip": (clipkit.autoclip, ("norm_history", "norm_count")),
    "zclip": (lambda: clipkit.zclip(warmup=2),
              ("norm_mean", "norm_var", "warmup_norms", "warmup_count")),
}


@pytest.mark.parametrize("name", sorted(STATS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_step_leaves_statistics_unchanged(name, bad):
  factory, fields = STATS[name]
  tx = factory()
  update = jax.jit(tx.update)
  seq = norm_sequence(3, 4)
  state = tx.init(seq[0])
  for g in seq:
    _, state = update(g, state)
  g = jax.tree.map(np.copy, seq[0])
  g["b"][0][1, 2] = bad
  out, after = update(g, state)
  for f in fields:
    np.testing.assert_array_equal(getattr(after, f), getattr(state, f))
  # The step's output stays non-finite and its metrics report it.
  np.testing.assert_array_equal(out["b"][0], g["b"][0])
  assert not np.isfinite(clipkit.metrics(after)["grad_norm"])
  # The next finite step behaves as if the bad one never happened.
  u1, s1 = update(seq[1], after)
  u2, s2 = update(seq[1], state)
  np.testing.assert_array_equal(u1["a"], u2["a"])
  for f in fields:
    np.testing.assert_array_equal(getattr(s1, f), getattr(s2, f))


def test_huge_finite_gradients_are_clipped_not_zeroed():
  tx = clipkit.adaptive(max_norm=1.0)
  g = {"w": jnp.full((1000,), 100.0, jnp.float16)}
  out, state = tx.update(g, tx.init(g))
  assert np.all(np.asarray(out["w"], np.float32) > 0)
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(out["w"], np.float32)), 1.0, rtol=1e-2)
  np.testing.assert_allclose(state.grad_norm, 100 * np.sqrt(1000), rtol=1e-3)


@pytest.mark.parametrize("name", sorted(STATS))
def test_norm_beyond_float32_is_clipped_after_warmup(name):
  # Finite float32 updates whose norm overflows float32 are still clipped to
  # a finite threshold once there are statistics, never passed through.
  tx = STATS[name][0]()
  update = jax.jit(tx.update)
  seq = norm_sequence(5, 4)
  state = tx.init(seq[0])
  for g in seq:
    _, state = update(g, state)
  big = jax.tree.map(lambda x: np.full_like(x, 3e38), seq[0])
  out, after = update(big, state)
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
  assert np.all(np.isfinite(flat)) and np.all(flat > 0)
  # zclip reports the threshold in force; the rule's limit clips to mu.
  target = after.norm_mean if name == "zclip" else after.clip_threshold
  np.testing.assert_allclose(np.linalg.norm(flat.astype(np.float64)),
                             target, rtol=1e-4)


@pytest.mark.parametrize("factory,arg,bad,message", [
    (clipkit.autoclip, "percentile", 100.5, "a number in \\[0, 100\\]"),
    (clipkit.autoclip, "percentile", -1.0, "a number in \\[0, 100\\]"),
    (clipkit.adaptive, "percentile", float("nan"), "a number in \\[0, 100\\]"),
    (clipkit.autoclip, "history", 0, "an integer >= 1"),
    (clipkit.adaptive, "history", 2.5, "an integer >= 1"),
    (clipkit.zclip, "decay", 1.0, "a number in \\(0, 1\\)"),
    (clipkit.zclip, "decay", 0.0, "a number in \\(0, 1\\)"),
    (clipkit.zclip, "warmup", 0, "an integer >= 1"),
    (clipkit.zclip, "z_threshold", 0.0, "a positive number"),
    (clipkit.zclip, "eps", -1e-6, "a non-negative number"),
    (clipkit.zclip, "max_norm", -1.0, "a non-negative number"),
    (clipkit.autoclip, "max_norm", -1.0, "a non-negative number"),
    (clipkit.adaptive, "max_norm", "1", "a non-negative number"),
    (clipkit.adaptive, "growth", -0.1, "a non-negative number"),
    (clipkit.adaptive, "scale", -0.1, "a non-negative number"),
])
def test_bad_arguments_raise_at_construction(factory, arg, bad, message):
  with pytest.raises(ValueError, match=f"`{arg}` must be {message}, got"):
    factory(**{arg: bad})


def test_traced_structural_argument_names_static_args():
  with pytest.raises(ValueError, match="static_args=\\('history',\\)"):
    jax.jit(lambda h: clipkit.autoclip(history=h))(10)


def test_zclip_metrics():
  tx = clipkit.zclip(warmup=2)
  state = tx.init({"w": jnp.zeros(1)})
  for g in (1.0, 3.0, 50.0):
    _, state = tx.update({"w": jnp.array([g])}, state)
  m = clipkit.metrics(state)
  assert set(m) == {"grad_norm", "clip_threshold", "clip_scale", "norm_mean",
                    "norm_std", "norm_z"}
  np.testing.assert_allclose(m["norm_z"], (50 - 2) / (1 + 1e-6), rtol=1e-5)
  assert m["clip_threshold"] < 50 and m["clip_scale"] < 1


@pytest.mark.parametrize("name", sorted(STATS))
def test_checkpoint_resumes_bit_identically(name, tmp_path):
  tx = STATS[name][0]()
  update = jax.jit(tx.update)
  seq = norm_sequence(4, 8)
  state = tx.init(seq[0])
  for g in seq[:4]:
    _, state = update(g, state)
  restored = flax.serialization.from_bytes(
      tx.init(seq[0]), flax.serialization.to_bytes(state))
  a, b = state, restored
  for g in seq[4:]:
    ua, a = update(g, a)
    ub, b = update(g, b)
    np.testing.assert_array_equal(ua["a"], ub["a"])
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_adaptive_defaults_tame_exploding_sgd():
  # The demo's regression with SGD diverges unclipped; adaptive() trains it.
  task = tasks.regression_task(steps=300)
  sgd = optax.sgd(0.01, momentum=0.9)
  unclipped, _, _ = tasks.train_task(task, sgd)
  clipped, _, metrics = tasks.train_task(
      task, optax.chain(clipkit.adaptive(), sgd))
  assert not np.isfinite(unclipped)
  y_var = np.var(np.asarray(tasks.make_regression()[1]))
  assert clipped < 0.05 * y_var
  # Step 1 is clipped, to a tenth of its norm, and so are most steps.
  norms = np.asarray(metrics["grad_norm"])
  thresholds = np.asarray(metrics["clip_threshold"])
  np.testing.assert_allclose(thresholds[0], 0.1 * norms[0], rtol=1e-5)
  assert np.mean(thresholds < norms) > 0.9
