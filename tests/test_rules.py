"""Each rule against an independent numpy reference, properties, and errors."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import Mesh, PartitionSpec as P

import optax_clipkit as clipkit
from optax_clipkit import _tactics


def np_global(leaves, c):
  leaves = [np.asarray(x, np.float64) for x in leaves]
  norm = np.sqrt(sum(np.sum(x * x) for x in leaves))
  s = c / norm if norm > c else 1.0
  return [x * s for x in leaves], norm


def np_per_leaf(leaves, c):
  out = []
  for x in leaves:
    x = np.asarray(x, np.float64)
    n = np.sqrt(np.sum(x * x))
    out.append(x * (c / n) if n > c else x)
  return out


def apply(tx, leaves):
  out, state = jax.jit(tx.update)(list(leaves), tx.init(list(leaves)))
  return [np.asarray(x, np.float64) for x in out], state


# Magnitudes under 1e-6 are left out: per-leaf norms below ~1e-19 and
# subnormal elements are outside the documented exact range.
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32).filter(
    lambda v: v == 0 or abs(v) > 1e-6)
trees = st.lists(
    hnp.arrays(np.float32,
               hnp.array_shapes(min_dims=0, max_dims=4, max_side=4),
               elements=finite),
    min_size=1, max_size=4)
thresholds = st.floats(0.0, 100.0, width=32).filter(
    lambda v: v == 0 or v > 1e-6)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees, thresholds)
def test_global_norm_matches_numpy_and_properties(code_path, leaves, c):
  out, state = apply(clipkit.global_norm(c), leaves)
  ref, norm = np_global(leaves, c)
  for a, b in zip(out, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-5, atol=1e-30)
  assert np.sqrt(sum(np.sum(x * x) for x in out)) <= c * (1 + 1e-5) + 1e-30 \
      or norm <= c
  if norm <= c:  # Unchanged, bit for bit.
    for a, x in zip(out, leaves):
      np.testing.assert_array_equal(a, x)
  # Idempotent.
  again, _ = apply(clipkit.global_norm(c), [x.astype(np.float32) for x in out])
  for a, b in zip(again, out):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees, thresholds)
def test_per_leaf_norm_matches_numpy(code_path, leaves, c):
  out, state = apply(clipkit.per_leaf_norm(c), leaves)
  for a, b in zip(out, np_per_leaf(leaves, c)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  norms = [np.sqrt(np.sum(np.float64(x) ** 2)) for x in leaves]
  np.testing.assert_allclose(
      state.clipped_fraction, np.mean([n > c for n in norms]), atol=1e-6)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees, thresholds)
def test_value_matches_numpy(code_path, leaves, c):
  out, state = apply(clipkit.value(c, count_clipped=True), leaves)
  for a, x in zip(out, leaves):
    np.testing.assert_array_equal(
        a, np.clip(x, -np.float32(c), np.float32(c)))
  flat = np.concatenate([x.ravel() for x in leaves])
  np.testing.assert_allclose(
      state.clipped_fraction, np.mean(np.abs(flat) > np.float32(c)),
      atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_value_count_near_the_threshold(dtype, code_path):
  c = 0.3
  # Elements just above and below the threshold, in every leaf's dtype.
  base = np.array([c, -c, 2 * c, 0.0, np.inf, -np.inf], np.float32)
  steps = np.array([1, -1, 0], np.float32)[:, None] * 1e-2 * c
  x = (base + steps).ravel()
  leaves = [jnp.asarray(x, dtype), jnp.asarray(-x[:5], dtype)]
  tx = clipkit.value(c, count_clipped=True)
  _, state = jax.jit(tx.update)(leaves, tx.init(leaves))
  flat = np.concatenate([np.asarray(v, np.float32) for v in leaves])
  np.testing.assert_allclose(state.clipped_fraction,
                             np.mean(np.abs(flat) > np.float32(c)), atol=1e-7)


def test_value_without_count_clips_alike_and_drops_the_metric():
  leaves = [np.array([3.0, -0.5, -2.0], np.float32), np.array([0.25], np.float32)]
  counted, _ = apply(clipkit.value(1.0, count_clipped=True), leaves)
  out, state = apply(clipkit.value(1.0), leaves)
  for a, b in zip(out, counted):
    np.testing.assert_array_equal(a, b)
  assert state.clipped_fraction is None
  assert set(clipkit.metrics(state)) == {"clip_threshold"}


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_value_count_flag_must_be_bool(bad):
  with pytest.raises(TypeError, match=re.escape(
      f"`count_clipped` must be a bool, got {bad!r}")):
    clipkit.value(1.0, count_clipped=bad)


def test_matches_optax_on_ordinary_inputs():
  g = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4)}
  ours, _ = clipkit.global_norm(2.0).update(g, None)
  theirs, _ = optax.clip_by_global_norm(2.0).update(g, None)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
  ours, _ = clipkit.value(2.0).update(g, clipkit.value(2.0).init(g))
  theirs, _ = optax.clip(2.0).update(g, None)
  chex.assert_trees_all_equal(ours, theirs)


@pytest.mark.parametrize(
    "dtype,value,size",
    [(jnp.float16, 100.0, 1000), (jnp.bfloat16, 1e20, 1000),
     (jnp.float32, 1e20, 1000), (jnp.float32, 3e38, 10),
     # Single elements: XLA must not fold the scale factors together.
     (jnp.float32, 3e38, 1), (jnp.bfloat16, 3e38, 1),
     (jnp.bfloat16, 1e20, 10_000),
     (jnp.float32, 1e20, 10_000)],
)
@pytest.mark.parametrize("factory", [clipkit.global_norm,
                                     clipkit.per_leaf_norm])
def test_finite_gradients_of_any_size_keep_direction(factory, dtype, value,
                                                     size, code_path):
  x = np.linspace(0.5, 1.0, size) * value
  g = {"x": jnp.asarray(x, dtype), "y": jnp.asarray(-x[:3], dtype),
       "z": jnp.asarray(x[-5:] / 2, dtype)}
  c = 1.0
  tx = factory(c)
  out, state = jax.jit(tx.update)(g, tx.init(g))
  for k in g:
    o = np.asarray(out[k], np.float64)
    assert np.all(np.isfinite(o)) and np.all(o != 0), (k, o)
    ref = np.asarray(g[k], np.float64)
    cos = np.sum(o * ref) / np.linalg.norm(o) / np.linalg.norm(ref)
    assert cos > 1 - 1e-3
  if factory is clipkit.global_norm:
    total = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2)
                        for v in out.values()))
    np.testing.assert_allclose(total, c, rtol=1e-2)
  else:
    for v in out.values():
      np.testing.assert_allclose(
          np.linalg.norm(np.asarray(v, np.float64)), c, rtol=1e-2)


@pytest.mark.parametrize("factory", [clipkit.global_norm,
                                     clipkit.per_leaf_norm])
def test_complex_leaves_match_numpy(factory, code_path):
  rng = np.random.default_rng(0)
  shapes = [(3,), (4, 5), (5000,)]
  leaves = [(rng.normal(size=s) + 1j * rng.normal(size=s)).astype(np.complex64)
            for s in shapes] + [rng.normal(size=6).astype(np.float32)]
  c = 2.0
  tx = factory(c)
  out, _ = jax.jit(tx.update)(leaves, tx.init(leaves))
  norms = [np.linalg.norm(x.astype(np.complex128)) for x in leaves]
  if factory is clipkit.global_norm:
    scales = [c / np.linalg.norm(norms)] * len(leaves)
  else:
    scales = [min(1.0, c / n) for n in norms]
  for o, x, s in zip(out, leaves, scales):
    assert o.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(o), x * s, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("factory", [
    clipkit.global_norm, clipkit.per_leaf_norm,
    functools.partial(clipkit.value, count_clipped=True)])
@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="an XLA:CPU tactic; other backends never lower it")
def test_small_leaves_compile_to_few_reductions_on_cpu(factory, monkeypatch):
  # XLA:CPU compiles many small reductions slowly: on a single CPU device
  # small leaves are packed and reduced together.
  g = [jnp.ones((i + 1,)) for i in range(40)] + [jnp.ones((64, 128))]

  def count_reductions(packed):
    monkeypatch.setattr(_tactics, "single_device", lambda: packed)
    tx = factory(1.0)  # A new function: no cached trace.
    return jax.jit(tx.update).lower(g, tx.init(g)).as_text().count(
        "stablehlo.reduce")

  one_by_one, packed = count_reductions(False), count_reductions(True)
  assert one_by_one >= 40
  assert packed <= 12, packed


@pytest.fixture(params=["small_groups", "portable"])
def global_norm_path(request):
  """A single GPU's grouped global norm (with small limits, so that groups
  split) and the per-leaf one of TPU and several GPUs."""
  return request.getfixturevalue(request.param)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(hnp.arrays(np.float32,
                           hnp.array_shapes(min_dims=0, max_dims=3,
                                            max_side=7),
                           elements=finite), min_size=1, max_size=9),
       thresholds)
def test_global_norm_paths_match_numpy(global_norm_path, leaves, c):
  out, state = apply(clipkit.global_norm(c), leaves)
  ref, norm = np_global(leaves, c)
  np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-5, atol=1e-30)
  for a, b in zip(out, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,value", [
    (jnp.float32, 3e38), (jnp.float32, 1e20), (jnp.bfloat16, 3e38),
    (jnp.float16, 100.0), (jnp.float32, 1.0)])
def test_grouped_global_norm_survives_overflow(small_groups, dtype, value):
  # Leaves in groups, alone, complex, empty, and the guarantees of
  # `_numerics`: finite updates keep their direction at any size.
  x = np.linspace(0.5, 1.0, 100) * value
  g = {"big": jnp.asarray(x, dtype), "a": jnp.asarray(-x[:3], dtype),
       "b": jnp.asarray(x[-5:].reshape(5, 1) / 2, dtype),
       "c": jnp.asarray(x[:7], dtype), "e": jnp.zeros((0, 3), dtype),
       "z": jnp.asarray(x[:4] * (1 + 2j), jnp.complex64)}
  out, state = jax.jit(clipkit.global_norm(1.0).update)(
      g, clipkit.global_norm(1.0).init(g))
  ref = {k: np.asarray(v, np.complex128) for k, v in g.items()}
  norm = np.sqrt(sum(np.sum(np.abs(v) ** 2) for v in ref.values()))
  if norm < np.finfo(np.float32).max:
    np.testing.assert_allclose(state.grad_norm, norm, rtol=1e-5)
  for k in g:
    o = np.asarray(out[k], np.complex128)
    np.testing.assert_allclose(o, ref[k] * min(1.0, 1.0 / norm),
                               rtol=1e-2, atol=1e-30)
  g["a"] = g["a"].at[1].set(jnp.nan)
  out, state = jax.jit(clipkit.global_norm(1.0).update)(
      g, clipkit.global_norm(1.0).init(g))
  assert np.isnan(state.grad_norm)
  chex.assert_trees_all_equal(out, g)


def _x64():
  # `jax.enable_x64` from jax 0.8 on; the experimental one before.
  enable = getattr(jax, "enable_x64", None)
  if enable is not None:
    return enable(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


def check_float32_beside_float64(factory):
  # Summed in float64, a float32 leaf must be squared in float64 too: its
  # squares overflow float32 above about 1.8e19.
  with _x64():
    g = {"d": jnp.ones((3,), jnp.float64),
         "w": jnp.full((50,), 1e20, jnp.float32),
         "s": jnp.full((5,), -1e20, jnp.float32)}
    tx = factory(1.0)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    out = {k: np.asarray(v, np.float64) for k, v in out.items()}
  norms = {k: np.linalg.norm(np.asarray(v, np.float64)) for k, v in g.items()}
  if factory is clipkit.global_norm:
    total = np.sqrt(sum(n ** 2 for n in norms.values()))
    np.testing.assert_allclose(state.grad_norm, total, rtol=1e-6)
    scales = {k: 1.0 / total for k in g}
  else:
    scales = {k: min(1.0, 1.0 / n) for k, n in norms.items()}
  for k in g:
    np.testing.assert_allclose(out[k], np.asarray(g[k], np.float64) * scales[k],
                               rtol=1e-6)


@pytest.mark.parametrize("factory", [clipkit.global_norm,
                                     clipkit.per_leaf_norm])
def test_large_float32_leaves_beside_float64_ones(factory, code_path):
  check_float32_beside_float64(factory)


# The metric `clip_threshold` is float32: 1e160 reads inf there.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_small_leaves_beside_huge_float64_ones_are_not_nan(code_path):
  # A norm of 1e160 scales by factors such as 2**-548, which are 0 in
  # float32: the float32, bfloat16 and complex64 leaves beside it must be
  # scaled in float64 (1/sqrt(2) here, the threshold being that norm / 2).
  with _x64():
    g = {"a": jnp.full((2,), 1e160, jnp.float64),
         "b": jnp.ones((1,), jnp.float32), "c": jnp.ones((1,), jnp.bfloat16),
         "d": jnp.ones((1,), jnp.complex64)}
    tx = clipkit.global_norm(1e160)
    out, _ = jax.jit(tx.update)(g, tx.init(g))
    out = {k: np.asarray(v) for k, v in out.items()}
  np.testing.assert_allclose(out["a"], 1e160 / np.sqrt(2), rtol=1e-6)
  for k in "bcd":
    assert out[k].dtype == g[k].dtype
    np.testing.assert_allclose(np.asarray(out[k], np.complex128),
                               1 / np.sqrt(2), rtol=1e-2)


@pytest.mark.parametrize("factory", [clipkit.global_norm,
                                     clipkit.per_leaf_norm])
def test_large_float32_leaves_beside_float64_ones_elsewhere(
    factory, global_norm_path):
  check_float32_beside_float64(factory)


@pytest.mark.parametrize("factory,arg", [(clipkit.global_norm, 1.0),
                                         (clipkit.per_leaf_norm, 1.0),
                                         (clipkit.value, 1.0)])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_input_stays_non_finite(factory, arg, bad, code_path):
  g = {"a": jnp.array([3.0, bad, -2.0])}
  tx = factory(arg)
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  assert not np.all(np.isfinite(out["a"]))
  if factory is clipkit.value:
    np.testing.assert_array_equal(out["a"], [1.0, np.nan, -1.0])
  else:
    np.testing.assert_array_equal(out["a"], g["a"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("c", [0.3, 1.0, 1000.7, 6e4])
def test_value_on_every_half_precision_number(dtype, c):
  # All 65,536 bit patterns: the same as clipping in the leaf's dtype to the
  # threshold rounded to it.
  x = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(dtype)
  tx = clipkit.value(c)
  out, _ = jax.jit(tx.update)(jnp.asarray(x), tx.init(jnp.asarray(x)))
  assert out.dtype == dtype
  r = np.float32(np.asarray(c, dtype))
  x32 = x.astype(np.float32)
  ref = np.where(np.isfinite(x32), np.clip(x32, -r, r), np.nan)
  # Exact, except that XLA:CPU flushes float32 subnormals (bfloat16's
  # subnormals) to zero.
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0,
                             atol=np.finfo(np.float32).tiny)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_value_keeps_signed_zeros_and_turns_non_finite_into_nan(dtype):
  x = jnp.array([-0.0, 0.0, np.inf, -np.inf, np.nan, -5.0, 0.5], dtype)
  tx = clipkit.value(2.0)
  for update in (tx.update, jax.jit(tx.update)):
    out, _ = update(x, tx.init(x))
    assert out.dtype == x.dtype
    out = np.asarray(out, np.float32)
    np.testing.assert_array_equal(out, [0.0, 0.0, np.nan, np.nan, np.nan,
                                        -2.0, 0.5])
    np.testing.assert_array_equal(np.signbit(out[:2]), [True, False])


@pytest.mark.parametrize("factory,name", [(clipkit.global_norm, "max_norm"),
                                          (clipkit.per_leaf_norm, "max_norm"),
                                          (clipkit.value, "max_value")])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1.0", None, True,
                                 np.ones(2)])
def test_bad_threshold_raises_at_construction(factory, name, bad):
  with pytest.raises(ValueError, match=re.escape(
      f"`{name}` must be a non-negative number, got {bad!r}")):
    factory(bad)


def test_integer_leaves_rejected_at_init():
  with pytest.raises(TypeError, match=r"\['n'\] of dtype int32"):
    clipkit.global_norm(1.0).init({"n": jnp.zeros(2, jnp.int32)})


@jax.numpy_dtype_promotion("standard")  # optax.adam mixes int and float.
def test_metrics_keys_plain_and_disambiguated():
  g = {"a": jnp.array([3.0, 4.0])}
  one = optax.chain(clipkit.global_norm(1.0), optax.adam(1e-3))
  m = clipkit.metrics(jax.jit(one.update)(g, one.init(g), g)[1])
  assert set(m) == {"grad_norm", "clip_threshold", "clip_scale"}
  np.testing.assert_allclose(m["grad_norm"], 5.0)
  two = optax.inject_hyperparams(
      lambda: optax.chain(clipkit.value(1.0, count_clipped=True),
                          optax.adam(1e-3),
                          clipkit.global_norm(1.0)))()
  m = clipkit.metrics(jax.jit(two.update)(g, two.init(g), g)[1])
  assert set(m) == {"0/clip_threshold", "0/clipped_fraction",
                    "2/grad_norm", "2/clip_threshold", "2/clip_scale"}
  np.testing.assert_allclose(m["0/clipped_fraction"], 1.0)
  assert clipkit.metrics(optax.adam(1e-3).init(g)) == {}


@pytest.mark.parametrize("factory", [clipkit.global_norm,
                                     clipkit.per_leaf_norm])
def test_shard_map_axis_name_gives_global_norm(factory):
  mesh = Mesh(np.array(jax.devices()), ("d",))
  # A small leaf and a large one (8192 elements per shard): they take
  # different passes.
  x = jnp.arange(16.0) - 8.0
  y = jnp.cos(jnp.arange(8 * 8192.0))

  def run(axis_name):
    tx = factory(1.0, axis_name=axis_name)

    def f(x, y):
      g = {"x": x, "y": y}
      return tx.update(g, tx.init(g))[1].grad_norm[None]

    f = jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    return np.asarray(jax.jit(f)(x, y))

  both = np.concatenate([x, y])
  np.testing.assert_allclose(run("d"), np.linalg.norm(both), rtol=1e-5)
  # Without axis_name, each device sees the norm of its own shards.
  local = [np.linalg.norm(np.concatenate([a, b])) for a, b in
           zip(np.split(np.asarray(x), 8), np.split(np.asarray(y), 8))]
  np.testing.assert_allclose(run(None), local, rtol=1e-5)


def test_update_is_differentiable(code_path):
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}

  def loss(tx, g):
    return jnp.sum(jnp.sin(jax.tree.leaves(tx.update(g, None)[0])[0]))

  ours = jax.grad(functools.partial(loss, clipkit.global_norm(1.0)))(g)
  theirs = jax.grad(functools.partial(loss, optax.clip_by_global_norm(1.0)))(g)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize("factory,name", [(clipkit.global_norm, "max_norm"),
                                          (clipkit.per_leaf_norm, "max_norm"),
                                          (clipkit.value, "max_value")])
@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_invalid_traced_threshold_turns_updates_nan(factory, name, bad,
                                                    code_path):
  # Through inject_hyperparams nothing can raise: the mistake must show.
  tx = optax.inject_hyperparams(factory)(**{name: 1.0})
  g = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([0.5])}
  state = tx.init(g)
  state.hyperparams[name] = jnp.asarray(bad)
  out, _ = jax.jit(tx.update)(g, state)
  for leaf in jax.tree.leaves(out):
    assert np.all(np.isnan(leaf)), out


@pytest.mark.parametrize("factory", [clipkit.global_norm,
                                     clipkit.per_leaf_norm])
def test_norms_too_small_to_square_read_as_zero(factory, code_path):
  # The documented limit: squares below float32's normal range flush to
  # zero, so a positive threshold below ~1e-19 leaves such norms unchanged.
  g = {"a": jnp.array([1e-30, -2e-30])}
  tx = factory(1e-32)
  out, state = jax.jit(tx.update)(g, tx.init(g))
  np.testing.assert_array_equal(out["a"], g["a"])
  assert state.grad_norm == 0


@pytest.mark.parametrize("factory", [clipkit.global_norm,
                                     clipkit.per_leaf_norm])
@pytest.mark.parametrize("x", [1e-20, 1e-30, 3.0])
def test_zero_threshold_zeroes_norms_of_any_size(factory, x, code_path):
  g = {"a": jnp.array([x, -x]), "b": jnp.zeros(3)}
  tx = factory(0.0)
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
