"""per_module on real Flax Linen and NNX models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_clipkit as clipkit
from optax_clipkit._per_module import leaf_path


class GravesModel(nn.Module):
  """An LSTM through time with a dense head (Graves, 2013)."""

  @nn.compact
  def __call__(self, x):
    h = nn.RNN(nn.OptimizedLSTMCell(8))(x)
    return nn.Dense(3)(h[:, -1])


def graves_setup():
  model = GravesModel()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 2))
  y = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  params = model.init(jax.random.PRNGKey(2), x)

  def loss(p):  # Scaled so that both groups have large derivatives.
    return 1e4 * jnp.mean(jnp.square(model.apply(p, x) - y))

  return params, jax.grad(loss)(params)


def paths_of(tree):
  return {leaf_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_graves_ranges_land_on_the_right_leaves():
  params, grads = graves_setup()
  tx = optax.chain(
      clipkit.per_module({"LSTMCell": (-10, 10), "Dense_0": (-100, 100)}),
      optax.sgd(1.0),
  )
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  new = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
  before, after, raw = paths_of(params), paths_of(new.params), paths_of(grads)
  assert "params/OptimizedLSTMCell_0/ii/kernel" in raw
  assert "params/Dense_0/kernel" in raw
  hit = {10: 0, 100: 0}
  for path, g in raw.items():
    limit = 10 if "LSTMCell" in path else 100
    step = np.asarray(before[path] - after[path])
    np.testing.assert_allclose(step, np.clip(g, -limit, limit), rtol=1e-6)
    hit[limit] += int(np.sum(np.abs(g) > limit))
  assert hit[10] > 0 and hit[100] > 0  # Both ranges did clip something.
  m = clipkit.metrics(new.opt_state)
  assert set(m) == {"LSTMCell/clip_threshold", "LSTMCell/clipped_fraction",
                    "Dense_0/clip_threshold", "Dense_0/clipped_fraction"}
  np.testing.assert_allclose(m["LSTMCell/clip_threshold"], 10)


def test_group_norms_are_per_group():
  params, grads = graves_setup()
  tx = clipkit.per_module([
      ("LSTMCell", clipkit.global_norm(1.0), "lstm"),
      ("Dense", clipkit.global_norm(1.0), "head"),
  ])
  out, state = jax.jit(tx.update)(grads, tx.init(params))
  m = clipkit.metrics(state)
  raw, clipped = paths_of(grads), paths_of(out)
  for name, key in (("lstm", "LSTMCell"), ("head", "Dense")):
    group = [np.asarray(g, np.float64) for p, g in raw.items() if key in p]
    norm = np.sqrt(sum(np.sum(g * g) for g in group))
    np.testing.assert_allclose(m[f"{name}/grad_norm"], norm, rtol=1e-5)
    after = [np.asarray(g) for p, g in clipped.items() if key in p]
    np.testing.assert_allclose(
        np.sqrt(sum(np.sum(g * g) for g in after)), 1.0, rtol=1e-5)


def test_first_matching_rule_wins_and_default_takes_the_rest():
  g = {"params": {"Dense_0": {"kernel": jnp.full((2,), 5.0),
                              "bias": jnp.full((2,), 5.0)},
                  "Dense_1": {"kernel": jnp.full((2,), 5.0)}}}
  tx = clipkit.per_module(
      [("Dense_0/kernel", (-1, 1)), ("Dense_0", (-2, 2))],
      default=optax.identity(),
  )
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(out["params"]["Dense_0"]["kernel"], [1, 1])
  np.testing.assert_array_equal(out["params"]["Dense_0"]["bias"], [2, 2])
  np.testing.assert_array_equal(out["params"]["Dense_1"]["kernel"], [5, 5])


class NnxModel(nnx.Module):

  def __init__(self, rngs):
    self.encoder = nnx.Linear(3, 4, rngs=rngs)
    self.decoder = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.decoder(jax.nn.tanh(self.encoder(x)))


def test_nnx_optimizer():
  model = NnxModel(nnx.Rngs(0))
  tx = optax.chain(
      clipkit.per_module({"encoder": clipkit.global_norm(0.5),
                          "decoder/kernel": (-0.01, 0.01)},
                         default=optax.identity()),
      optax.sgd(1.0),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = jnp.ones((5, 3)), jnp.full((5, 2), 10.0)

  def loss(m):
    return jnp.mean(jnp.square(m(x) - y))

  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  grads = nnx.grad(loss)(model)
  optimizer.update(model, grads)
  after = nnx.state(model, nnx.Param)
  enc = [np.asarray(grads["encoder"][k][...]) for k in ("kernel", "bias")]
  enc_norm = np.sqrt(sum(np.sum(g * g) for g in enc))
  assert enc_norm > 0.5
  for k, g in zip(("kernel", "bias"), enc):
    step = before["encoder"][k][...] - np.asarray(after["encoder"][k][...])
    np.testing.assert_allclose(step, g * 0.5 / enc_norm, rtol=1e-5)
  dk = np.asarray(grads["decoder"]["kernel"][...])
  step = before["decoder"]["kernel"][...] - np.asarray(after["decoder"]["kernel"][...])
  np.testing.assert_allclose(step, np.clip(dk, -0.01, 0.01), rtol=1e-5)
  db = np.asarray(grads["decoder"]["bias"][...])  # The default: unclipped.
  step = before["decoder"]["bias"][...] - np.asarray(after["decoder"]["bias"][...])
  np.testing.assert_allclose(step, db, rtol=1e-5)
  m = clipkit.metrics(optimizer.opt_state)
  np.testing.assert_allclose(m["encoder/grad_norm"], enc_norm, rtol=1e-5)


def test_nnx_paths_drop_the_trailing_value():
  state = nnx.state(NnxModel(nnx.Rngs(0)), nnx.Param)
  assert set(paths_of(state)) == {"encoder/kernel", "encoder/bias",
                                  "decoder/kernel", "decoder/bias"}


def test_unmatched_leaves_are_listed():
  g = {f"layer{i}": jnp.ones(2) for i in range(8)}
  g["head"] = jnp.ones(2)
  tx = clipkit.per_module({"head": (-1, 1)})
  with pytest.raises(ValueError, match=(
      r"8 leaf path\(s\) match no rule and `default` is None: \['layer0',"
      r" 'layer1', 'layer2', 'layer3', 'layer4'\] and 3 more\.")):
    tx.init(g)


def test_rule_matching_nothing_is_an_error():
  g = {"params": {"Dense_0": {"kernel": jnp.ones(2)}}}
  tx = clipkit.per_module({"Dens_0": (-1, 1)}, default=optax.identity())
  with pytest.raises(ValueError,
                     match=r"Rule pattern\(s\) \['Dens_0'\] match no leaf"):
    tx.init(g)


@pytest.mark.parametrize("rules,error,message", [
    ({"a": (-1, 2)}, ValueError, "must be a symmetric range"),
    ({"a": (1, -1)}, ValueError, "must be a non-negative number"),
    ({"a": 3.0}, TypeError, "must be an optax.GradientTransformation"),
    ({"(": (-1, 1)}, ValueError, "is not a valid regular expression"),
    ({}, ValueError, "must hold at least one rule"),
    ([("a", (-1, 1), "x"), ("b", (-1, 1), "x")], ValueError, "used twice"),
    (["a"], TypeError, "must be a mapping or a sequence"),
])
def test_bad_rules_raise_at_construction(rules, error, message):
  with pytest.raises(error, match=message):
    clipkit.per_module(rules)


def test_labels_computed_once_per_structure(monkeypatch):
  calls = []
  import optax_clipkit._per_module as pm
  original = pm.leaf_path
  monkeypatch.setattr(pm, "leaf_path", lambda p: calls.append(1) or original(p))
  g = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = clipkit.per_module({"a": (-1, 1)}, default=optax.identity())
  state = tx.init(g)
  update = jax.jit(tx.update)
  for _ in range(3):
    _, state = update(g, state)
  tx.update(g, state)
  assert len(calls) == 2  # Two leaves, once.
