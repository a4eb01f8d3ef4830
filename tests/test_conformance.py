"""One suite over every strategy: a new strategy joins with one registry line."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_clipkit as clipkit

def per_module(max_norm):
  # Leaves not under "nested" are one global-norm group; the rest go to the
  # default.
  return clipkit.per_module(
      [("^[^n]", clipkit.global_norm(max_norm), "main")],
      default=clipkit.value(0.3),
  )


# name -> (factory, numeric hyperparameters). Thresholds are chosen so that
# the test gradients below are clipped.
REGISTRY = {
    "adaptive": (clipkit.adaptive, {"start": 0.1, "max_norm": 1.0}),
    "autoclip": (clipkit.autoclip, {"percentile": 10.0, "max_norm": 1.0}),
    "global_norm": (clipkit.global_norm, {"max_norm": 1.0}),
    "per_leaf_norm": (clipkit.per_leaf_norm, {"max_norm": 0.5}),
    "per_module": (per_module, {"max_norm": 1.0}),
    "value": (clipkit.value, {"max_value": 0.3}),
    "value_uncounted": (functools.partial(clipkit.value, count_clipped=False),
                        {"max_value": 0.3}),
    "zclip": (clipkit.zclip, {"z_threshold": 2.5, "max_norm": 1.0}),
}
NAMES = sorted(REGISTRY)
# Arguments that fix the state's shape: `optax.inject_hyperparams` must not
# trace them.
STATIC = {"adaptive": ("coordinates",), "autoclip": ("history",),
          "zclip": ("warmup",)}


def make(name):
  factory, kwargs = REGISTRY[name]
  return factory(**kwargs)


def grads(dtype=jnp.float32, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
      "w": jax.random.normal(k1, (8, 16), jnp.float32).astype(dtype),
      "b": jax.random.normal(k2, (16,), jnp.float32).astype(dtype),
      "nested": [jax.random.normal(k3, (4, 8), jnp.float32).astype(dtype)],
  }


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager(name, reductions):
  tx = make(name)
  g = grads()
  eager, s_eager = tx.update(g, tx.init(g))
  jitted, s_jit = jax.jit(tx.update)(g, tx.init(g))
  chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
  chex.assert_trees_all_close(s_eager, s_jit, rtol=1e-6)
  # The test gradients are clipped: the output differs from the input.
  assert not np.allclose(eager["w"], g["w"])


@pytest.mark.parametrize("name", NAMES)
def test_no_retrace(name):
  tx = make(name)
  traces = []

  @jax.jit
  def step(g, s):
    traces.append(1)
    return tx.update(g, s)

  g = grads()
  state = tx.init(g)
  _, state = step(g, state)
  _, state = step(grads(seed=1), state)
  assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_equals_plain(name, reductions):
  factory, kwargs = REGISTRY[name]
  injected = optax.inject_hyperparams(
      factory, static_args=STATIC.get(name, ())
  )(**kwargs)
  plain = factory(**kwargs)
  g = grads()
  s_inj, s_plain = injected.init(g), plain.init(g)
  for seed in range(2):
    g = grads(seed=seed)
    u_inj, s_inj = jax.jit(injected.update)(g, s_inj)
    u_plain, s_plain = jax.jit(plain.update)(g, s_plain)
    chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-6)
  chex.assert_trees_all_close(
      clipkit.metrics(s_inj), clipkit.metrics(s_plain), rtol=1e-6
  )


@pytest.mark.parametrize("name", NAMES)
def test_chain_and_multisteps(name):
  g = grads()
  chained = optax.chain(make(name), optax.sgd(0.1))
  ref_updates, _ = make(name).update(g, make(name).init(g))
  updates, state = jax.jit(chained.update)(g, chained.init(g), g)
  chex.assert_trees_all_close(
      updates, jax.tree.map(lambda u: -0.1 * u, ref_updates), rtol=1e-6
  )
  assert clipkit.metrics(state)

  multi = optax.MultiSteps(chained, every_k_schedule=2)
  state = multi.init(g)
  step = jax.jit(multi.update)
  # optax.MultiSteps itself mixes int and float dtypes.
  with jax.numpy_dtype_promotion("standard"):
    zero, state = step(g, state, g)
    out, state = step(g, state, g)  # Mean of two equal grads: same as one.
  chex.assert_trees_all_close(zero, jax.tree.map(jnp.zeros_like, g))
  chex.assert_trees_all_close(out, updates, rtol=1e-6)
  assert set(clipkit.metrics(state)) == set(clipkit.metrics(make(name).init(g)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "dtypes",
    [
        (jnp.float32,),
        (jnp.bfloat16,),
        (jnp.float16,),
        (jnp.float32, jnp.bfloat16, jnp.float16),
    ],
)
def test_dtypes_preserved(name, dtypes, reductions):
  tx = make(name)
  g = grads()
  leaves, treedef = jax.tree.flatten(g)
  g = treedef.unflatten(
      [x.astype(dtypes[i % len(dtypes)]) for i, x in enumerate(leaves)]
  )
  out, state = jax.jit(tx.update)(g, tx.init(g))
  chex.assert_trees_all_equal_dtypes(out, g)
  ref, _ = tx.update(
      jax.tree.map(lambda x: x.astype(jnp.float32), g), tx.init(g)
  )
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(jnp.float32), out), ref,
      rtol=1e-2, atol=1e-3,
  )
  for v in clipkit.metrics(state).values():
    assert v.dtype == jnp.float32 and v.shape == ()


@pytest.mark.parametrize("name", NAMES)
def test_empty_none_and_masked_leaves(name, reductions):
  tx = make(name)
  for tree in ({}, [], {"a": None}):
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    assert out == tree
    assert all(np.isfinite(v) for v in clipkit.metrics(state).values())
  g = {"a": jnp.array([3.0, 4.0]), "b": None, "c": optax.MaskedNode()}
  out, _ = jax.jit(tx.update)(g, tx.init(g))
  assert out["b"] is None and out["c"] == optax.MaskedNode()
  ref, _ = tx.update({"a": g["a"]}, tx.init({"a": g["a"]}))
  np.testing.assert_allclose(out["a"], ref["a"])


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_stay_zero(name, reductions):
  tx = make(name)
  g = jax.tree.map(jnp.zeros_like, grads())
  out, state = jax.jit(tx.update)(g, tx.init(g))
  chex.assert_trees_all_equal(out, g)
  assert all(np.isfinite(v) for v in clipkit.metrics(state).values())


@pytest.mark.parametrize("name", NAMES)
def test_runs_in_scan(name, reductions):
  tx = make(name)
  g = grads()

  def body(state, seed):
    gs = jax.tree.map(lambda x: x * (1.0 + seed), g)
    updates, state = tx.update(gs, state)
    return state, clipkit.metrics(state)

  _, logged = jax.lax.scan(body, tx.init(g), jnp.arange(3.0))
  for v in logged.values():
    assert v.shape == (3,)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_inputs(name):
  assert jax.device_count() == 8, "conftest must set 8 host devices"
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  g = {
      # 8192 elements: a large leaf, next to small ones.
      "w": jax.random.normal(jax.random.PRNGKey(0), (128, 64)),
      "b": jax.random.normal(jax.random.PRNGKey(1), (64,)),
      "r": jax.random.normal(jax.random.PRNGKey(2), (8,)),
  }
  specs = {"w": P("data", "model"), "b": P("model"), "r": P()}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  sharded = jax.device_put(g, shardings)
  tx = make(name)
  step = jax.jit(tx.update)
  state = tx.init(g)
  hlo = step.lower(sharded, state).compile().as_text()
  assert "all-gather" not in hlo
  out, new_state = step(sharded, state)
  for k in g:
    assert out[k].sharding.is_equivalent_to(shardings[k], out[k].ndim)
  ref, ref_state = tx.update(g, tx.init(g))
  chex.assert_trees_all_close(out, ref, rtol=1e-5)
  chex.assert_trees_all_close(new_state, ref_state, rtol=1e-5)
