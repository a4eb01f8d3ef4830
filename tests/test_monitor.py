"""monitor against numpy; metric keys under NNX, chain edits and checkpoints."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

import optax_clipkit as clipkit


def linen_tree(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  shapes = {"Dense_0": {"kernel": (3, 4), "bias": (4,)},
            "Dense_1": {"kernel": (4, 2), "bias": (2,)},
            "LayerNorm_0": {"scale": (2,)}}
  return {"params": jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s), jnp.float32),
      shapes, is_leaf=lambda x: isinstance(x, tuple))}


def np_norm(leaves):
  return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                     for x in leaves))


def test_default_groups_match_numpy():
  params, grads = linen_tree(0), linen_tree(1, scale=3.0)
  grads["params"]["Dense_1"]["kernel"] = (
      grads["params"]["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
      .at[1, 1].set(jnp.inf))
  tx = clipkit.monitor()
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_equal(out, grads)  # Identity, NaN included.
  m = clipkit.metrics(state)
  assert sorted(m) == sorted(
      f"monitor/{g}/{k}" for g in ("Dense_0", "Dense_1", "LayerNorm_0")
      for k in ("update_norm", "param_norm", "update_param_ratio",
                "nonfinite_leaves"))
  for group in ("Dense_0", "LayerNorm_0"):
    u = np_norm(jax.tree.leaves(grads["params"][group]))
    p = np_norm(jax.tree.leaves(params["params"][group]))
    np.testing.assert_allclose(m[f"monitor/{group}/update_norm"], u, rtol=1e-6)
    np.testing.assert_allclose(m[f"monitor/{group}/param_norm"], p, rtol=1e-6)
    np.testing.assert_allclose(m[f"monitor/{group}/update_param_ratio"], u / p,
                               rtol=1e-6)
    assert m[f"monitor/{group}/nonfinite_leaves"] == 0
  assert m["monitor/Dense_1/nonfinite_leaves"] == 1  # The kernel.
  assert np.isnan(m["monitor/Dense_1/update_norm"])
  for v in m.values():
    assert isinstance(v, jax.Array) and v.dtype == jnp.float32 and v.shape == ()


def test_finite_updates_beyond_float32_are_not_counted_as_nonfinite():
  g = {"big": jnp.full(4, 3e38, jnp.float32), "nan": jnp.array([jnp.nan, 1.0])}
  tx = clipkit.monitor()
  _, state = tx.update(g, tx.init(g))
  m = clipkit.metrics(state)
  assert m["monitor/big/nonfinite_leaves"] == 0
  assert m["monitor/nan/nonfinite_leaves"] == 1


def test_group_rules():
  params = linen_tree(0)
  grads = linen_tree(1)
  kernels = lambda t: [t["params"][g]["kernel"] for g in ("Dense_0", "Dense_1")]
  for groups in (["kernel"], [("kernel", "kernels")], {"kernel": "kernels"}):
    tx = clipkit.monitor(groups, name="w")
    _, state = tx.update(grads, tx.init(params), params)
    m = clipkit.metrics(state)
    label = "kernel" if isinstance(groups, list) and groups == ["kernel"] else (
        "kernels")
    np.testing.assert_allclose(m[f"w/{label}/update_norm"],
                               np_norm(kernels(grads)), rtol=1e-6)
    rest = [grads["params"]["Dense_0"]["bias"], grads["params"]["Dense_1"][
        "bias"], grads["params"]["LayerNorm_0"]["scale"]]
    np.testing.assert_allclose(m["w/other/update_norm"], np_norm(rest),
                               rtol=1e-6)
  with pytest.raises(ValueError, match=r"pattern\(s\) \['kernal'\] match no"):
    clipkit.monitor(["kernal"]).init(params)
  with pytest.raises(ValueError, match="used twice"):
    clipkit.monitor([("a", "x"), ("b", "x")])
  with pytest.raises(ValueError, match="not a valid regular expression"):
    clipkit.monitor(["("])
  with pytest.raises(TypeError, match="`groups` must be"):
    clipkit.monitor([1])


def test_without_params_and_in_scan():
  tx = clipkit.monitor()
  g = {"a": jnp.ones(4), "b": jnp.ones(1)}

  def body(state, scale):
    _, state = tx.update(jax.tree.map(lambda x: x * scale, g), state)
    return state, clipkit.metrics(state)

  _, logged = jax.lax.scan(body, tx.init(g), jnp.arange(1.0, 4.0))
  np.testing.assert_allclose(logged["monitor/a/update_norm"], [2.0, 4.0, 6.0])
  np.testing.assert_array_equal(logged["monitor/a/param_norm"], 0.0)
  np.testing.assert_array_equal(logged["monitor/a/update_param_ratio"], 0.0)


def test_a_bare_array_is_the_group_all():
  tx = clipkit.monitor()
  g = jnp.array([3.0, 4.0])
  m = clipkit.metrics(tx.update(g, tx.init(g), g)[1])
  assert float(m["monitor/all/update_norm"]) == 5.0


def test_axis_name_makes_norms_and_counts_global():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tx = clipkit.monitor(axis_name="data")
  g = {"w": jnp.arange(8.0).reshape(8, 1).at[3, 0].set(jnp.nan),
       "v": jnp.ones((8, 1))}

  def local(g, s):
    _, s = tx.update(g, s, None)
    return s

  state = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()),
                        out_specs=P())(g, tx.init(g))
  m = clipkit.metrics(state)
  assert m["monitor/w/nonfinite_leaves"] == 1
  np.testing.assert_allclose(m["monitor/v/update_norm"], np.sqrt(8.0))


class Model(nnx.Module):

  def __init__(self, rngs):
    self.encoder = nnx.Linear(3, 4, rngs=rngs)
    self.decoder = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.decoder(jax.nn.tanh(self.encoder(x)))


def test_nnx_optimizer_metrics_are_arrays():
  model = Model(nnx.Rngs(0))
  tx = optax.chain(
      clipkit.monitor(name="grads"),
      clipkit.skip_spikes(optax.chain(clipkit.global_norm(1.0),
                                      optax.sgd(0.1)), window=4, name="guard"),
      clipkit.monitor(name="steps"),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = jnp.ones((5, 3)), jnp.full((5, 2), 10.0)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean(jnp.square(m(x) - y)))(model)
    optimizer.update(model, grads, loss=loss)
    return clipkit.metrics(optimizer.opt_state)

  for _ in range(3):
    logged = train_step(model, optimizer)
  m = clipkit.metrics(optimizer.opt_state)
  assert m.keys() == logged.keys()
  for key in ("grads/encoder/update_norm", "steps/decoder/update_param_ratio",
              "guard/skipped", "guard/skip_loss", "grad_norm"):
    assert key in m
  for v in m.values():
    assert type(v) is type(jnp.zeros(())), type(v)  # pylint: disable=unidiomatic-typecheck
    assert v.dtype == jnp.float32
  assert float(m["guard/skip_loss"]) > 0


def chains():
  """The same named clipkit transformations, around different optax ones."""
  guard = lambda: clipkit.skip_spikes(optax.sgd(0.1), window=4, name="guard")
  mon = lambda: clipkit.monitor(name="mon")
  return [
      optax.chain(mon(), guard()),
      optax.chain(optax.identity(), mon(), optax.scale(1.0), guard()),
      optax.chain(optax.clip(10.0), optax.chain(mon(), guard()),
                  optax.trace(0.0)),
      optax.MultiSteps(optax.chain(mon(), guard()), every_k_schedule=1
                       ).gradient_transformation(),
      optax.named_chain(("watch", mon()), ("lr", optax.scale(1.0)),
                        ("skip", guard())),
      optax.chain(guard(), optax.add_decayed_weights(0.0), mon()),
  ]


def test_named_keys_are_stable_under_chain_edits():
  g = {"a": jnp.ones(3), "b": jnp.ones(2)}
  keys = []
  for tx in chains():
    with jax.numpy_dtype_promotion("standard"):  # MultiSteps mixes dtypes.
      _, state = tx.update(g, tx.init(g), g)
    keys.append(sorted(clipkit.metrics(state)))
  assert all(k == keys[0] for k in keys), keys
  assert "mon/a/update_norm" in keys[0] and "guard/skip_count" in keys[0]
  with pytest.raises(ValueError, match="named 'mon'"):
    tx = optax.chain(clipkit.monitor(name="mon"), clipkit.monitor(name="mon"))
    clipkit.metrics(tx.init(g))


def test_orbax_restore_without_target(tmp_path):
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  tx = optax.chain(clipkit.global_norm(1.0), clipkit.monitor(name="mon"),
                   clipkit.skip_spikes(optax.sgd(0.1), window=4))
  _, state = tx.update(params, tx.init(params), params)
  path = os.path.join(tmp_path, "ckpt")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
  with ocp.StandardCheckpointer() as ckpt:
    bare = ckpt.restore(path)  # Dicts and lists, not the state's classes.
    restored = ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                               tx.init(params)))
  # With a target, everything, names and groups included, is as saved.
  chex.assert_trees_all_equal(clipkit.metrics(restored), clipkit.metrics(state))
  # Without one, the states are still found; the unnamed keep their keys, a
  # monitor's groups are numbered and names are gone (they are not saved).
  found = clipkit.metrics(bare)
  want = clipkit.metrics(state)
  for key in ("0/grad_norm", "2/skipped", "2/skip_grad_norm"):
    np.testing.assert_array_equal(found[key], want[key])
  np.testing.assert_array_equal(found["1/0/update_norm"],
                                want["mon/a/update_norm"])
