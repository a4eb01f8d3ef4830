"""Small training tasks for `adaptive_study.py`: exploding and healthy.

Every task is a few-thousand-parameter model written in plain JAX, so a run
of a few hundred steps takes seconds on a CPU and seeds can be vmapped. A
task is ``Task(init, loss, sample, evaluate, steps, lr)``: ``init(key)``
gives parameters, ``loss(params, batch)`` a scalar, ``sample(key)`` a batch,
``evaluate(params)`` the final loss on fixed held-out data, and ``lr`` maps
``"sgd"``/``"adam"`` to the learning rate (``None``: arm not run).

Tasks are split in two, and the split is part of the study's method:

- `DESIGN`: the tasks the rule of `adaptive()` was designed and tuned on.
- `HELD_OUT`: tasks that played no part in choosing the rule or its
  defaults; they are run only to report.

Exploding tasks are ones where SGD without clipping diverges or ends far
worse than a fixed threshold; healthy ones train well without clipping.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tasks import adding_data, make_regression


class Task(NamedTuple):
  init: Callable
  loss: Callable
  sample: Callable
  evaluate: Callable
  steps: int
  lr: dict
  exploding: bool
  schedule: str = "constant"  # or "warmup_cosine"


# ---------------------------------------------------------------- regression
def init_mlp(key, sizes, gain=np.sqrt(6.0), act_bias=0.0):
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1),
                              zip(sizes[:-1], sizes[1:])):
    lim = gain / np.sqrt(n_in)
    params.append({"w": jax.random.uniform(k, (n_in, n_out), minval=-lim,
                                           maxval=lim),
                   "b": jnp.full((n_out,), act_bias)})
  return params


def mlp(params, x, act=jax.nn.relu):
  for layer in params[:-1]:
    x = act(x @ layer["w"] + layer["b"][None])
  return x @ params[-1]["w"] + params[-1]["b"][None]


def regression(steps, standardize=False, batch=32):
  """An MLP 20-25-1 (ReLU) on a linear target; unscaled targets explode."""
  x, y = make_regression()
  if standardize:
    y = y / y.std()
  x, y = jnp.asarray(x[:500]), jnp.asarray(y[:500])

  def loss(p, b):
    return jnp.mean(jnp.square(mlp(p, b[0])[:, 0] - b[1]))

  def sample(key):
    idx = jax.random.randint(key, (batch,), 0, x.shape[0])
    return x[idx], y[idx]

  return Task(init=lambda k: init_mlp(k, (20, 25, 1)), loss=loss,
              sample=sample, evaluate=lambda p: loss(p, (x, y)), steps=steps,
              lr={"sgd": 0.01, "adam": 0.03}, exploding=not standardize)


# ------------------------------------------------------- recurrent networks
def _sequence_task(init, cell, hidden, data, steps, lr, exploding, batch=16):
  """A recurrent `cell` through a sequence, a linear head on the last state."""

  def predict(p, x):
    h0 = cell.zeros(x.shape[0], hidden)
    h, _ = jax.lax.scan(lambda h, x_t: (cell(p, h, x_t), None), h0,
                        jnp.swapaxes(x, 0, 1))
    return (cell.out(h) @ p["wo"] + p["bo"][None])[:, 0]

  def loss(p, b):
    return jnp.mean(jnp.square(predict(p, b[0]) - b[1]))

  test = data(jax.random.PRNGKey(123), 512)
  return Task(init=init, loss=loss, sample=lambda k: data(k, batch),
              evaluate=lambda p: loss(p, test), steps=steps, lr=lr,
              exploding=exploding)


class _Tanh:
  zeros = staticmethod(lambda n, h: jnp.zeros((n, h)))
  out = staticmethod(lambda h: h)

  def __call__(self, p, h, x):
    return jnp.tanh(x @ p["wx"] + h @ p["wh"] + p["bh"][None])


class _LSTM:
  zeros = staticmethod(lambda n, h: (jnp.zeros((n, h)), jnp.zeros((n, h))))
  out = staticmethod(lambda hc: hc[0])

  def __call__(self, p, hc, x):
    h, c = hc
    z = x @ p["wx"] + h @ p["wh"] + p["bh"][None]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


class _GRU:
  zeros = staticmethod(lambda n, h: jnp.zeros((n, h)))
  out = staticmethod(lambda h: h)

  def __call__(self, p, h, x):
    zx = x @ p["wx"] + p["bh"][None]
    zr, zu, zn = jnp.split(zx, 3, axis=-1)
    hr, hu, hn = jnp.split(h @ p["wh"], 3, axis=-1)
    r = jax.nn.sigmoid(zr + hr)
    u = jax.nn.sigmoid(zu + hu)
    n = jnp.tanh(zn + r * hn)
    return (1 - u) * n + u * h


def _rnn_init(key, n_in, hidden, gates, gain, in_scale=0.5, bias=None):
  k1, k2, k3 = jax.random.split(key, 3)
  b = jnp.zeros((gates * hidden,)) if bias is None else bias
  return {"wx": jax.random.normal(k1, (n_in, gates * hidden)) * in_scale,
          "wh": jax.random.normal(k2, (hidden, gates * hidden))
                * (gain / np.sqrt(hidden)),
          "bh": b,
          "wo": jax.random.normal(k3, (hidden, 1)) / np.sqrt(hidden),
          "bo": jnp.zeros((1,))}


def adding_rnn(steps, gain=1.5, length=30, hidden=32, lr=None,
               exploding=True):
  """A vanilla tanh RNN on the adding problem; gain 1.5 explodes."""
  lr = lr or {"sgd": 0.1, "adam": 0.01}
  return _sequence_task(
      lambda k: _rnn_init(k, 2, hidden, 1, gain), _Tanh(), hidden,
      functools.partial(adding_data, length=length), steps, lr, exploding)


def adding_lstm(steps, lr, exploding, length=30, hidden=32, gain=1.0):
  """An LSTM (forget-gate bias 1) on the adding problem."""
  bias = jnp.zeros((4 * hidden,)).at[hidden:2 * hidden].set(1.0)
  return _sequence_task(
      lambda k: _rnn_init(k, 2, hidden, 4, gain, bias=bias), _LSTM(), hidden,
      functools.partial(adding_data, length=length), steps, lr, exploding)


def recall_data(key, n, length, delay):
  """Recall the value marked `delay` steps before the end, in noise."""
  kv, ki = jax.random.split(key)
  values = jax.random.normal(kv, (n, length))
  i = jax.random.randint(ki, (n,), 0, length - delay)
  markers = jax.nn.one_hot(i, length)
  return jnp.stack([values, markers], -1), jnp.sum(values * markers, axis=1)


def recall_gru(steps, hidden=24, length=24):
  """Held out: a GRU with recurrent gain 3 recalling a marked value."""
  return _sequence_task(
      lambda k: _rnn_init(k, 2, hidden, 3, 3.0, in_scale=1.0), _GRU(),
      hidden, functools.partial(recall_data, length=length, delay=4), steps,
      {"sgd": 0.3, "adam": 0.01}, True)


# ------------------------------------------------------------ deep networks
def deep_tanh(steps, depth=8, width=32, gain=2.5, batch=32):
  """Held out: a deep tanh MLP in the chaotic regime on a teacher's target.

  Weights drawn with gain 2.5 make the backward pass grow with depth; the
  target is a fixed random two-layer teacher with outputs of order 5.
  """
  rng = np.random.default_rng(7)
  x = rng.standard_normal((1024, 16)).astype(np.float32)
  w1 = rng.standard_normal((16, 32)).astype(np.float32) / 4
  w2 = rng.standard_normal((32,)).astype(np.float32)
  y = np.tanh(x @ w1) @ w2
  x, y = jnp.asarray(x), jnp.asarray(5 * y / y.std())

  def init(key):
    sizes = (16,) + (width,) * depth + (1,)
    return init_mlp(key, sizes, gain=gain * np.sqrt(3.0))

  def loss(p, b):
    return jnp.mean(jnp.square(mlp(p, b[0], jnp.tanh)[:, 0] - b[1]))

  def sample(key):
    idx = jax.random.randint(key, (batch,), 0, 768)
    return x[idx], y[idx]

  return Task(init=init, loss=loss, sample=sample,
              evaluate=lambda p: loss(p, (x[768:], y[768:])), steps=steps,
              lr={"sgd": 0.05, "adam": 0.003}, exploding=True)


def classifier(steps, batch=64):
  """Held out, healthy: an MLP 32-64-10 on a mixture of 10 Gaussians."""
  rng = np.random.default_rng(3)
  centres = rng.standard_normal((10, 32)).astype(np.float32) * 0.6
  labels = rng.integers(0, 10, 4096)
  x = centres[labels] + rng.standard_normal((4096, 32)).astype(np.float32)
  x, labels = jnp.asarray(x), jnp.asarray(labels)

  def loss(p, b):
    logits = mlp(p, b[0])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, b[1]))

  def sample(key):
    idx = jax.random.randint(key, (batch,), 0, 3072)
    return x[idx], labels[idx]

  return Task(init=lambda k: init_mlp(k, (32, 64, 10)), loss=loss,
              sample=sample,
              evaluate=lambda p: loss(p, (x[3072:], labels[3072:])),
              steps=steps, lr={"sgd": 0.05, "adam": 1e-3}, exploding=False)


def residual_mlp(steps, depth=12, width=32, gain=1.6, batch=32):
  """Exploding: a residual ReLU MLP without normalization, teacher target.

  Each of the 12 blocks adds ``relu(h @ w + b)`` to ``h``, with ``w`` drawn
  at 1.6 / sqrt(width): the activations grow with depth, and the first
  gradient norms (some 1e7) are 1e5-1e6 times the parameters' norm (about
  30). SGD without clipping blows up on its first steps; the fixed
  thresholds 5 and 10 train it, smaller ones end far behind.
  """
  rng = np.random.default_rng(9)
  x = rng.standard_normal((2048, 16)).astype(np.float32)
  teacher = rng.standard_normal((16, 16)).astype(np.float32) / 4
  y = np.tanh(x @ teacher).sum(-1)
  x, y = jnp.asarray(x), jnp.asarray(y / y.std())

  def init(key):
    ks = jax.random.split(key, depth + 2)
    return {"inp": jax.random.normal(ks[0], (16, width)) / 4,
            "out": jax.random.normal(ks[1], (width, 1)) / np.sqrt(width),
            "blocks": [{"w": jax.random.normal(k, (width, width))
                             * gain / np.sqrt(width),
                        "b": jnp.zeros(width)} for k in ks[2:]]}

  def loss(p, b):
    h = b[0] @ p["inp"]
    for blk in p["blocks"]:
      h = h + jax.nn.relu(h @ blk["w"] + blk["b"][None])
    return jnp.mean(jnp.square((h @ p["out"])[:, 0] - b[1]))

  def sample(key):
    idx = jax.random.randint(key, (batch,), 0, 1536)
    return x[idx], y[idx]

  return Task(init=init, loss=loss, sample=sample,
              evaluate=lambda p: loss(p, (x[1536:], y[1536:])), steps=steps,
              lr={"sgd": 0.01, "adam": 1e-3}, exploding=True)


def cnn(steps, batch=32):
  """Healthy: two convolutions and a dense layer on 8 x 8 images.

  Ten classes, each a random pattern shifted by up to a pixel, under noise.
  """
  rng = np.random.default_rng(11)
  protos = rng.standard_normal((10, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 4096)
  shifts = rng.integers(-1, 2, (4096, 2))
  x = np.stack([np.roll(protos[c], sh, (0, 1))
                for c, sh in zip(labels, shifts)])
  x = x + rng.standard_normal(x.shape).astype(np.float32)
  x, labels = jnp.asarray(x), jnp.asarray(labels)
  dims = ("NHWC", "HWIO", "NHWC")

  def init(key):
    k = jax.random.split(key, 3)
    he = lambda kk, shape, fan: (jax.random.normal(kk, shape)
                                 * np.sqrt(2.0 / fan))
    return {"c1": he(k[0], (3, 3, 1, 8), 9), "b1": jnp.zeros(8),
            "c2": he(k[1], (3, 3, 8, 16), 72), "b2": jnp.zeros(16),
            "w": he(k[2], (4 * 4 * 16, 10), 256), "b": jnp.zeros(10)}

  def loss(p, b):
    conv = lambda h, w, s: jax.lax.conv_general_dilated(
        h, w, (s, s), "SAME", dimension_numbers=dims)
    h = jax.nn.relu(conv(b[0], p["c1"], 1) + p["b1"][None, None, None])
    h = jax.nn.relu(conv(h, p["c2"], 2) + p["b2"][None, None, None])
    logits = h.reshape(h.shape[0], -1) @ p["w"] + p["b"][None]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, b[1]))

  def sample(key):
    idx = jax.random.randint(key, (batch,), 0, 3072)
    return x[idx], labels[idx]

  return Task(init=init, loss=loss, sample=sample,
              evaluate=lambda p: loss(p, (x[3072:], labels[3072:])),
              steps=steps, lr={"sgd": 0.02, "adam": 1e-3}, exploding=False)


def logistic(steps, batch=64):
  """Healthy, convex: softmax regression, 5 classes, features of scales
  0.3 to 3, from zero weights."""
  rng = np.random.default_rng(21)
  scales = np.geomspace(0.3, 3, 40).astype(np.float32)
  z = rng.standard_normal((4096, 40)).astype(np.float32)
  teacher = rng.standard_normal((40, 5)).astype(np.float32)
  labels = np.argmax(z @ teacher + rng.gumbel(size=(4096, 5)), -1)
  x, labels = jnp.asarray(z * scales), jnp.asarray(labels)

  def loss(p, b):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        b[0] @ p["w"] + p["b"][None], b[1]))

  def sample(key):
    idx = jax.random.randint(key, (batch,), 0, 3072)
    return x[idx], labels[idx]

  return Task(init=lambda k: {"w": jnp.zeros((40, 5)), "b": jnp.zeros(5)},
              loss=loss, sample=sample,
              evaluate=lambda p: loss(p, (x[3072:], labels[3072:])),
              steps=steps, lr={"sgd": 0.02, "adam": 1e-2}, exploding=False)


def heavy_tail(steps, batch=32):
  """Exploding (spikes): an MLP regression whose training targets carry
  Student-t noise (1.2 degrees of freedom); tested on clean targets."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((4096, 10)).astype(np.float32)
  w = rng.standard_normal((10,)).astype(np.float32)
  y = np.sin(x @ w / 2) * 3
  noisy = y + rng.standard_t(1.2, 4096).astype(np.float32)
  x, y, noisy = jnp.asarray(x), jnp.asarray(y), jnp.asarray(noisy)

  def loss(p, b):
    return jnp.mean(jnp.square(mlp(p, b[0])[:, 0] - b[1]))

  def sample(key):
    idx = jax.random.randint(key, (batch,), 0, 3072)
    return x[idx], noisy[idx]

  return Task(init=lambda k: init_mlp(k, (10, 32, 32, 1)), loss=loss,
              sample=sample,
              evaluate=lambda p: loss(p, (x[3072:], y[3072:])), steps=steps,
              lr={"sgd": 0.01, "adam": 3e-3}, exploding=True)


# --------------------------------------------------------- a tiny char GPT
def _corpus(n_chars=300_000):
  """Python source text shipped with optax, as bytes in [0, 96)."""
  root = os.path.dirname(optax.__file__)
  chunks = []
  for dirpath, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      if f.endswith(".py"):
        with open(os.path.join(dirpath, f), "rb") as fh:
          chunks.append(fh.read())
  data = np.frombuffer(b"".join(chunks)[:n_chars], np.uint8).astype(np.int32)
  data = np.where(data == 10, 127, data)  # newline -> one of the 96 symbols
  return np.clip(data - 32, 0, 95)


def char_gpt(steps, d=32, heads=2, layers=2, ctx=32, batch=16):
  """Held out, healthy: a 2-layer pre-LN GPT on source code, AdamW."""
  data = jnp.asarray(_corpus())
  split = int(0.9 * data.shape[0])
  vocab = 96

  def init(key):
    ks = iter(jax.random.split(key, 4 + 4 * layers))
    n = lambda shape, s=0.02: jax.random.normal(next(ks), shape) * s
    p = {"emb": n((vocab, d)), "pos": n((ctx, d)), "lnf": jnp.ones((d,)),
         "blocks": []}
    for _ in range(layers):
      p["blocks"].append({"ln1": jnp.ones((d,)), "ln2": jnp.ones((d,)),
                          "qkv": n((d, 3 * d)), "proj": n((d, d)),
                          "fc": n((d, 4 * d)), "out": n((4 * d, d))})
    return p

  def ln(x, g):
    x = x - jnp.mean(x, -1, keepdims=True)
    return g * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5)

  def forward(p, tokens):
    x = p["emb"][tokens] + p["pos"][None]
    mask = jnp.tril(jnp.ones((ctx, ctx), bool))
    for blk in p["blocks"]:
      q, k, v = jnp.split(ln(x, blk["ln1"]) @ blk["qkv"], 3, -1)
      split_heads = lambda t: t.reshape(t.shape[0], ctx, heads, -1)
      q, k, v = map(split_heads, (q, k, v))
      att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
      att = jax.nn.softmax(jnp.where(mask, att, -1e9), -1)
      y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape)
      x = x + y @ blk["proj"]
      x = x + jax.nn.gelu(ln(x, blk["ln2"]) @ blk["fc"]) @ blk["out"]
    return ln(x, p["lnf"]) @ p["emb"].T

  def loss(p, b):
    logits = forward(p, b[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, b[:, 1:]))

  def windows(starts):
    return jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (ctx + 1,)))(
        starts)

  def sample(key):
    return windows(jax.random.randint(key, (batch,), 0, split - ctx - 1))

  test = windows(jnp.arange(split, data.shape[0] - ctx - 1, 997)[:64])
  return Task(init=init, loss=loss, sample=sample,
              evaluate=lambda p: loss(p, test), steps=steps,
              lr={"sgd": 0.3, "adam": 3e-3}, exploding=False,
              schedule="warmup_cosine")


# ------------------------------------------------------------- the suites
def design(steps: int) -> dict[str, Task]:
  """Tasks the rule was designed and tuned on."""
  return {
      "regression": regression(steps),
      "adding-rnn": adding_rnn(steps),
      "adding-lstm": adding_lstm(steps, {"sgd": 1.0, "adam": 0.01}, True),
      "regression-std": regression(steps, standardize=True),
      "healthy-rnn": adding_rnn(steps, gain=0.9, length=20,
                                lr={"sgd": 0.03, "adam": 0.003},
                                exploding=False),
      "healthy-lstm": adding_lstm(steps, {"sgd": 0.1, "adam": 0.003}, False),
  }


def held_out(steps: int) -> dict[str, Task]:
  """Tasks that played no part in designing the rule."""
  return {
      "deep-tanh": deep_tanh(steps),
      "recall-gru": recall_gru(steps),
      "classifier": classifier(steps),
      "char-gpt": char_gpt(steps),
  }


def families(steps: int) -> dict[str, Task]:
  """Families added after the rule was designed, as a second held-out check
  (`adaptive_study.py --families`). The cap of the first threshold on the
  parameters' norm was then made for `residual-mlp`."""
  return {
      "cnn": cnn(steps),
      "logistic": logistic(steps),
      "heavy-tail": heavy_tail(steps),
      "residual-mlp": residual_mlp(steps),
  }
