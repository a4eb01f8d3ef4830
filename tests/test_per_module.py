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


def test_metrics_of_an_nnx_optimizer_are_arrays_that_stay_put():
  # nnx.Optimizer keeps its state in mutable Variables: metrics logged at one
  # step must not change when a later step updates the state.
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax.chain(clipkit.global_norm(0.1), optax.sgd(0.1)),
      wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return clipkit.metrics(optimizer.opt_state)

  first = step(model, optimizer, jnp.ones((1, 3)))
  assert all(isinstance(v, jax.Array) for v in first.values())
  norm = float(first["grad_norm"])
  step(model, optimizer, jnp.zeros((1, 3)))
  assert float(first["grad_norm"]) == norm > 0.1
  assert isinstance(clipkit.metrics(optimizer.opt_state)["grad_norm"], jax.Array)


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


# A character-level LSTM with an embedding and a dense head, in Linen and in
# NNX: the models every example of the docs is run on.
TEXT = ("the quick brown fox jumps over the lazy dog. pack my box with five"
        " dozen liquor jugs! how vexingly quick daft zebras jump; sphinx of"
        " black quartz, judge my vow. ")
CHARS = sorted(set(TEXT))
VOCAB, EMBED, HIDDEN = len(CHARS), 16, 32


class LinenCharLSTM(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.RNN(nn.OptimizedLSTMCell(HIDDEN))(nn.Embed(VOCAB, EMBED)(x))
    return nn.Dense(VOCAB)(h)


class NnxCharLSTM(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs)
    self.lstm = nnx.RNN(nnx.OptimizedLSTMCell(EMBED, HIDDEN, rngs=rngs))
    self.head = nnx.Linear(HIDDEN, VOCAB, rngs=rngs)

  def __call__(self, x):
    return self.head(self.lstm(self.embed(x)))


def char_batch(batch, length, seed=0):
  """`batch` windows of `length` + 1 characters: inputs and next characters."""
  ids = np.array([CHARS.index(c) for c in TEXT * 8], np.int32)
  starts = np.random.default_rng(seed).integers(0, len(ids) - length - 1, batch)
  seq = ids[starts[:, None] + np.arange(length + 1)]
  return jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:])


def char_model(framework):
  """``(params, grad(reduce, x, y))`` for the Linen or the NNX model.

  ``grad`` differentiates ``reduce(per-character losses)`` at ``params``.
  """
  def losses(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  if framework == "linen":
    model = LinenCharLSTM()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    return params, lambda reduce, x, y: jax.grad(
        lambda p: reduce(losses(model.apply(p, x), y)))(params)
  model = NnxCharLSTM(nnx.Rngs(0))
  return nnx.state(model, nnx.Param), lambda reduce, x, y: nnx.grad(
      lambda m: reduce(losses(m(x), y)))(model)


# The docs' rules for each model: (rules, per_module keywords, group of a
# leaf path: "lstm", "head" or "embed").
def group_of(path):
  if "LSTMCell" in path or path.startswith("lstm/"):
    return "lstm"
  return "embed" if "mbed" in path else "head"


def docs_rules(framework):
  if framework == "linen":
    yield {"OptimizedLSTMCell": (-10, 10), "Dense": (-100, 100)}, {}
  else:
    model = NnxCharLSTM(nnx.Rngs(0))
    yield ({nnx.OptimizedLSTMCell: (-10, 10), nnx.Linear: (-100, 100)},
           {"model": model})
    yield {"lstm": (-10, 10), "head": (-100, 100)}, {}


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_docs_examples_clip_each_group_to_its_range(framework):
  params, _ = char_model(framework)
  grads = jax.tree.map(
      lambda p: 300.0 * jax.random.normal(jax.random.PRNGKey(3), p.shape),
      params)
  limits = {"lstm": 10.0, "head": 100.0, "embed": np.inf}
  for rules, kwargs in docs_rules(framework):
    tx = clipkit.per_module(rules, default=optax.identity(), **kwargs)
    out, state = jax.jit(tx.update)(grads, tx.init(params))
    seen = set()
    for path, g in paths_of(grads).items():
      group = group_of(path)
      seen.add(group)
      np.testing.assert_array_equal(
          paths_of(out)[path], np.clip(g, -limits[group], limits[group]))
    assert seen == {"lstm", "head", "embed"}
    assert len(clipkit.metrics(state)) == 4  # Two groups, two stats each.


def test_nnx_class_rules_in_the_optimizer():
  model = NnxCharLSTM(nnx.Rngs(0))
  tx = clipkit.per_module(
      [(nnx.OptimizedLSTMCell, (-1e-3, 1e-3), "lstm"),
       (nnx.Linear, clipkit.global_norm(1e-3), "head")],
      default=optax.identity(), model=model)
  optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(1.0)),
                            wrt=nnx.Param)
  x, y = char_batch(4, 20)

  def loss(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  before = paths_of(jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
  grads = paths_of(nnx.grad(loss)(model))
  optimizer.update(model, nnx.grad(loss)(model))
  steps = {p: before[p] - np.asarray(v) for p, v in
           paths_of(nnx.state(model, nnx.Param)).items()}
  head = [p for p in grads if p.startswith("head/")]
  head_norm = np.sqrt(sum(np.sum(np.square(grads[p])) for p in head))
  for path, g in grads.items():
    if path.startswith("lstm/"):  # The cell's own nnx.Linear layers too.
      want = np.clip(g, -1e-3, 1e-3)
    elif path.startswith("head/"):
      want = g * 1e-3 / head_norm
    else:
      want = g
    # A step is read back as a difference of parameters of size about 1.
    np.testing.assert_allclose(steps[path], want, rtol=1e-4, atol=1e-7)
  m = clipkit.metrics(optimizer.opt_state)
  assert {"lstm/clipped_fraction", "head/grad_norm"} <= set(m)


def test_nnx_class_name_pattern_error_shows_the_fix():
  model = NnxCharLSTM(nnx.Rngs(0))
  tx = clipkit.per_module({"OptimizedLSTMCell": (-10, 10), "Dense": (-100, 100)},
                          default=optax.identity())
  with pytest.raises(ValueError, match=(
      r"\['OptimizedLSTMCell', 'Dense'\] match no leaf\. The leaf paths are"
      r" e\.g\. \['embed/embedding'.*NNX paths are made of attribute names\."
      r" Match those, or give the class and the model: per_module\(\{"
      r"nnx\.OptimizedLSTMCell: \.\.\.\}, model=model\)\.")):
    nnx.Optimizer(model, tx, wrt=nnx.Param)


def test_class_rule_after_a_rule_for_its_parts_is_an_error():
  model = NnxCharLSTM(nnx.Rngs(0))
  # The cell's nnx.Linear layers go to the first rule: nothing is left.
  tx = clipkit.per_module({nnx.Linear: (-1, 1), nnx.OptimizedLSTMCell: (-1, 1)},
                          default=optax.identity(), model=model)
  with pytest.raises(ValueError, match="put the rule for an enclosing module"):
    tx.init(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("kwargs,error,message", [
    ({}, TypeError,
     r"class LSTMCell needs the model .* per_module\(\{LSTMCell: \.\.\.\},"
     r" model=model\)"),
    ({"model": "linen"}, TypeError,
     r"`model` must be a Flax NNX Module.*got LinenCharLSTM\. In Linen, the"
     r" class name is part of the path"),
    ({"model": "nnx"}, ValueError,
     r"Rule class LSTMCell has no instance in `model`; its modules are of the"
     r" classes \['Embed', 'Linear', 'NnxCharLSTM', 'OptimizedLSTMCell',"
     r" 'RNN'\]\."),
])
def test_class_rule_errors(kwargs, error, message):
  models = {"linen": LinenCharLSTM(), "nnx": NnxCharLSTM(nnx.Rngs(0))}
  kwargs = {k: models[v] for k, v in kwargs.items()}
  with pytest.raises(error, match=message):
    clipkit.per_module({nnx.LSTMCell: (-10, 10)}, **kwargs)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_graves_ranges_bind_on_a_summed_loss_and_scale_with_the_mean(framework):
  # Graves's ranges are for a loss summed over the characters of the batch's
  # sequences. Its gradient exceeds both ranges; the mean's is n times
  # smaller and never reaches them, unless the ranges are divided by n.
  _, grad = char_model(framework)
  x, y = char_batch(16, 100)
  n = y.size
  # Full float32 matrix products (a GPU's default, TF32, rounds the two
  # gradients apart by more than the comparison below allows).
  with jax.default_matmul_precision("float32"):
    summed, mean = grad(jnp.sum, x, y), grad(jnp.mean, x, y)
  rules = list(docs_rules(framework))[0]

  def ranges(c):
    return [(key, (-c * hi, c * hi)) for key, (_, hi) in rules[0].items()]

  def clip(c, grads):
    tx = clipkit.per_module(ranges(c), default=optax.identity(), **rules[1])
    out, state = tx.update(grads, tx.init(grads))
    fractions = {k.split("/")[0]: float(v)
                 for k, v in clipkit.metrics(state).items()
                 if k.endswith("clipped_fraction")}
    return out, fractions

  out_summed, f_summed = clip(1.0, summed)
  assert len(f_summed) == 2 and all(f > 0 for f in f_summed.values())
  _, f_mean = clip(1.0, mean)
  assert all(f == 0 for f in f_mean.values())
  out_mean, f_scaled = clip(1.0 / n, mean)
  assert f_scaled == pytest.approx(f_summed, abs=1e-3)
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3,
                                                       atol=1e-7 / n)
  jax.tree.map(chex_close, out_mean, jax.tree.map(lambda g: g / n, out_summed))


def test_ranges_and_counted_value_run_under_shard_map():
  # The count runs apart from the clip on CPU, in a `cond`; under shard_map
  # its result varies from device to device, and it must still trace (on
  # every platform: each platform's branch is traced).
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ("x",))
  g = {"w": jnp.arange(64.0) - 32.0}
  for tx in (clipkit.value(1.0, count_clipped=True),
             clipkit.per_module({"w": (-1.0, 1.0)})):
    f = jax.jit(jax.shard_map(lambda g, tx=tx: tx.update(g, tx.init(g))[0],
                              mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    np.testing.assert_array_equal(f(g)["w"], np.clip(g["w"], -1.0, 1.0))


@pytest.mark.parametrize("make,error,match", [
    (lambda: clipkit.per_module(None), TypeError, "`rules` must be .* got None"),
    (lambda: clipkit.per_module({"w": clipkit.global_norm(1.0)},
                                default=optax.identity),
     TypeError, "call it: `optax.identity\\(\\)`"),
    (lambda: clipkit.per_module({"w": ("a", 1.0)}), ValueError,
     "`rules\\['w'\\]\\[0\\]` must be a number, got 'a'"),
    (lambda: clipkit.monitor("attn"), TypeError, "goes in a list"),
])
def test_malformed_arguments_are_named_at_construction(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_ranges_and_thresholds_take_numpy_and_jax_scalars():
  g = {"w": jnp.array([-5.0, 0.5, 5.0])}
  tx = clipkit.per_module({"w": (np.float32(-1), np.float32(1))})
  np.testing.assert_array_equal(tx.update(g, tx.init(g))[0]["w"],
                                [-1.0, 0.5, 1.0])
  tx = clipkit.global_norm(jnp.bfloat16(1))
  np.testing.assert_allclose(
      np.linalg.norm(tx.update(g, tx.init(g))[0]["w"]), 1.0, rtol=1e-6)
