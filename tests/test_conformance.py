"""One suite over every strategy: a new strategy joins with one registry line."""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_clipkit as clipkit
from optax_clipkit import _tactics

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
    # monitor is the identity: chained before a clip, so the output differs.
    "monitor": (lambda max_norm: optax.chain(
        clipkit.monitor(), clipkit.global_norm(max_norm)), {"max_norm": 1.0}),
    "per_leaf_norm": (clipkit.per_leaf_norm, {"max_norm": 0.5}),
    "per_module": (per_module, {"max_norm": 1.0}),
    "skip_spikes": (lambda sigma: clipkit.skip_spikes(
        clipkit.global_norm(1.0), sigma=sigma, window=4), {"sigma": 6.0}),
    "value": (clipkit.value, {"max_value": 0.3}),
    "value_counted": (functools.partial(clipkit.value, count_clipped=True),
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
def test_jit_equals_eager(name, code_path):
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
def test_inject_hyperparams_equals_plain(name, code_path):
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
def test_dtypes_preserved(name, dtypes, code_path):
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
def test_empty_none_and_masked_leaves(name, code_path):
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
def test_zero_gradients_stay_zero(name, code_path):
  tx = make(name)
  g = jax.tree.map(jnp.zeros_like, grads())
  out, state = jax.jit(tx.update)(g, tx.init(g))
  chex.assert_trees_all_equal(out, g)
  assert all(np.isfinite(v) for v in clipkit.metrics(state).values())


@pytest.mark.parametrize("name", NAMES)
def test_runs_in_scan(name, code_path):
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
  # No leaf is gathered: `adaptive` gathers only its subset of coordinates
  # (a few per leaf), the others nothing.
  subset = state.prev_grads.size if name == "adaptive" else 0
  assert largest_gather(hlo) <= subset < g["w"].size
  out, new_state = step(sharded, state)
  for k in g:
    assert out[k].sharding.is_equivalent_to(shardings[k], out[k].ndim)
  ref, ref_state = tx.update(g, tx.init(g))
  chex.assert_trees_all_close(out, ref, rtol=1e-5)
  chex.assert_trees_all_close(new_state, ref_state, rtol=1e-5)


def largest_gather(hlo: str) -> int:
  """The most elements one all-gather of a compiled HLO module yields."""
  sizes = [0]
  for line in hlo.splitlines():
    m = re.search(r"=(.*?)\sall-gather(?:-start)?\(", line)
    if m:
      sizes.append(sum(math.prod(int(d) for d in dims.split(",") if d)
                       for dims in re.findall(r"\[([\d,]*)\]", m.group(1))))
  return max(sizes)


# One `stablehlo` op per line: `%name = "op"(operands...)` or `%name = op ...`.
_DEF = re.compile(r'^\s*(%[\w#.]+)(?::\d+)?(?:,\s*%[\w#.]+)*\s*=\s*"?([\w.]+)"?(.*)$')
_USE = re.compile(r"%[\w#.]+")


def data_dependent_control_flow(mlir: str) -> list[str]:
  """The `while` ops, and `case`/`if` ops whose operands are not constants."""
  const, found = set(), []
  for line in mlir.splitlines():
    m = _DEF.match(line)
    if not m:
      continue
    name, op, rest = m.groups()
    uses = _USE.findall(rest.split(")")[0] if op.endswith(("case", "if"))
                        else rest)
    if op == "stablehlo.constant" or (uses and all(u in const for u in uses)
                                      and op not in ("stablehlo.while",)):
      const.add(name)
    elif op in ("stablehlo.case", "stablehlo.if", "stablehlo.while"):
      found.append(op)
  return found


def test_control_flow_checker_can_fail():
  f = lambda x: jax.lax.cond(x.sum() > 0, lambda: x, lambda: -x)
  mlir = export.export(jax.jit(f), platforms=["cuda"])(jnp.ones(3)).mlir_module()
  assert data_dependent_control_flow(mlir) == ["stablehlo.case"]
  g = lambda x: jax.lax.platform_dependent(x, cpu=f, default=jnp.negative)
  mlir = export.export(jax.jit(g), platforms=["cuda"])(jnp.ones(3)).mlir_module()
  assert data_dependent_control_flow(mlir) == []


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", NAMES)
def test_no_data_dependent_control_flow_on_accelerators(name, platform):
  # On XLA:GPU a conditional or loop on data is a device-to-host sync.
  tx = make(name)
  g = {**grads(), "e": jnp.ones((4096, 8), jnp.bfloat16)}
  f = jax.jit(lambda g, s: tx.update(g, s, g))
  mlir = export.export(f, platforms=[platform])(g, tx.init(g)).mlir_module()
  assert data_dependent_control_flow(mlir) == []


def test_grouped_global_norm_lowers_to_few_reductions(small_groups):
  # One reduction (of two accumulators) per group of small leaves, closed at
  # 3 leaves or 60 elements: [1, 2, 3], [4, 30], [30, 30]; one per large
  # leaf; no control flow on data.
  g = [jnp.ones((n,)) for n in (1, 2, 3, 4, 30, 30, 30)] + [jnp.ones((8, 8))]
  tx = clipkit.adaptive()
  f = jax.jit(lambda g, s: tx.update(g, s, g))
  mlir = export.export(f, platforms=["cuda"])(g, tx.init(g)).mlir_module()
  assert data_dependent_control_flow(mlir) == []
  tx = clipkit.global_norm(1.0)
  text = jax.jit(tx.update).lower(g, tx.init(g)).as_text()
  assert text.count("stablehlo.reduce") == 4, text.count("stablehlo.reduce")


def test_one_gpu_lowers_the_grouped_norm_for_cuda(monkeypatch):
  # The real switch, lowered for CUDA from this host, as on a single GPU:
  # one reduction for all the small leaves, and no CPU branch in it.
  monkeypatch.setattr(_tactics, "single_device", lambda: True)
  g = [jnp.ones((n,)) for n in (1, 2, 3, 4, 30)] + [jnp.ones((8, 8))]
  tx = clipkit.global_norm(1.0)
  mlir = export.export(jax.jit(tx.update), platforms=["cuda"])(
      g, tx.init(g)).mlir_module()
  assert data_dependent_control_flow(mlir) == []
  assert mlir.count("stablehlo.reduce") == 1, mlir.count("stablehlo.reduce")
  assert mlir.count("stablehlo.concatenate") == 1


@pytest.mark.parametrize("name", NAMES)
def test_state_shape_dtype_shard_stability(name):
  # An update leaves the state's structure, shapes, dtypes (weak types too)
  # and shardings as init made them, so it can be a scan carry, a donated
  # buffer or a branch of lax.cond (optax contrib/_common_test.py).
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  shardings = {"w": NamedSharding(mesh, P("data", "model")),
               "b": NamedSharding(mesh, P("model")),
               "nested": [NamedSharding(mesh, P())]}
  g = jax.device_put(grads(), shardings)
  tx = make(name)
  state = jax.jit(tx.init)(g)

  @jax.jit
  def step(updates, state, flip):
    # lax.cond raises unless both branches give the same types.
    return jax.lax.cond(flip, lambda: tx.update(updates, state, g)[1],
                        lambda: state)

  new_state = state
  for seed in range(3):
    new_state = step(jax.device_put(grads(seed=seed), shardings), new_state,
                     jnp.bool_(True))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    if a.sharding.is_fully_replicated:
      assert b.sharding.is_fully_replicated, (a.sharding, b.sharding)
    else:
      assert b.sharding.is_equivalent_to(a.sharding, a.ndim), (a.sharding,
                                                               b.sharding)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in (
    "monitor", "per_module", "skip_spikes")])  # These report several states.
def test_unnamed_metrics_keys_are_plain(name):
  tx = make(name)
  g = grads()
  _, state = jax.jit(tx.update)(g, tx.init(g), g)
  keys = set(clipkit.metrics(state))
  assert keys and not any("/" in k for k in keys), keys
