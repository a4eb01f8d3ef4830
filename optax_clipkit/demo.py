"""Exploding gradients, and each clipping strategy fixing them.

Run: ``python -m optax_clipkit.demo``.

The classic experiment: a regression with 20 features (10 informative) and
unscaled targets (standard deviation in the hundreds), 500/500 train/test
samples, an MLP 20-25-1 with ReLU, trained by SGD (learning rate 0.01,
momentum 0.9, batch 32) for 100 epochs. Without clipping the loss becomes
NaN; with clipping it trains.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_clipkit as clipkit


def make_regression(n_samples=1000, n_features=20, n_informative=10,
                    noise=0.1, seed=1):
  """Gaussian features, a random sparse linear target (like scikit-learn's)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n_samples, n_features)).astype(np.float32)
  w = np.zeros((n_features,), np.float32)
  w[:n_informative] = 100 * rng.uniform(size=n_informative)
  y = x @ w + noise * rng.standard_normal(n_samples)
  return x, y.astype(np.float32)


def init_mlp(key, sizes=(20, 25, 1)):
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1),
                              zip(sizes[:-1], sizes[1:])):
    # He uniform, as in the Keras original of this experiment.
    lim = np.sqrt(6.0 / n_in)
    params.append({"w": jax.random.uniform(k, (n_in, n_out), minval=-lim,
                                           maxval=lim),
                   "b": jnp.zeros((n_out,))})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"][None])
  return (x @ params[-1]["w"] + params[-1]["b"][None])[:, 0]


def mse(params, x, y):
  return jnp.mean(jnp.square(mlp(params, x) - y))


def train(tx, data, epochs=100, batch=32, seed=0):
  """Trains with `tx`; returns (train MSE, test MSE, optimizer state)."""
  x_train, y_train, x_test, y_test = map(jnp.asarray, data)
  n_batches = len(x_train) // batch
  params = init_mlp(jax.random.PRNGKey(seed))
  state = tx.init(params)

  def step(carry, idx):
    params, state = carry
    grads = jax.grad(mse)(params, x_train[idx], y_train[idx])
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  @jax.jit
  def run(params, state, key):
    def epoch(carry, key):
      perm = jax.random.permutation(key, len(x_train))
      idx = perm[: n_batches * batch].reshape(n_batches, batch)
      return jax.lax.scan(step, carry, idx)[0], None
    keys = jax.random.split(key, epochs)
    (params, state), _ = jax.lax.scan(epoch, (params, state), keys)
    return params, state

  params, state = run(params, state, jax.random.PRNGKey(seed + 1))
  return (float(mse(params, x_train, y_train)),
          float(mse(params, x_test, y_test)), state)


def regression_task(steps=2000, batch=32, standardize=False):
  """The demo's regression as a task for `train_task` (random batches).

  With `standardize`, the targets are divided by their standard deviation:
  a healthy problem whose gradients do not explode, a control.
  """
  x, y = make_regression()
  if standardize:
    y = y / y.std()
  x_train, y_train = jnp.asarray(x[:500]), jnp.asarray(y[:500])

  def sample(key):
    idx = jax.random.choice(key, len(x_train), (batch,), replace=False)
    return x_train[idx], y_train[idx]

  return Task(init=init_mlp, loss=lambda p, b: mse(p, *b), sample=sample,
              evaluate=lambda p: mse(p, x_train, y_train), steps=steps)


def adding_task(length=30, hidden=32, steps=2000, batch=32):
  """A vanilla tanh RNN trained through time on the adding problem.

  Each input is a sequence of (value, marker) pairs, values uniform in
  [0, 1]; two markers, one in each half, pick the two values whose sum is the
  target. Predicting the mean gives an MSE of about 0.167. The recurrent
  weights start with a gain of 1.5, so gradients through time explode.
  """

  def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"wx": jax.random.normal(k1, (2, hidden)) * 0.5,
            "wh": jax.random.normal(k2, (hidden, hidden)) * (1.5 / np.sqrt(hidden)),
            "bh": jnp.zeros((hidden,)),
            "wo": jax.random.normal(k3, (hidden, 1)) / np.sqrt(hidden),
            "bo": jnp.zeros((1,))}

  def data(key, n):
    kv, ki, kj = jax.random.split(key, 3)
    values = jax.random.uniform(kv, (n, length))
    i = jax.random.randint(ki, (n,), 0, length // 2)
    j = jax.random.randint(kj, (n,), length // 2, length)
    markers = jax.nn.one_hot(i, length) + jax.nn.one_hot(j, length)
    return jnp.stack([values, markers], -1), jnp.sum(values * markers, axis=1)

  def predict(p, x):
    def cell(h, x_t):
      return jnp.tanh(x_t @ p["wx"] + h @ p["wh"] + p["bh"][None]), None
    h0 = jnp.zeros((x.shape[0], hidden))
    h, _ = jax.lax.scan(cell, h0, jnp.swapaxes(x, 0, 1))
    return (h @ p["wo"] + p["bo"][None])[:, 0]

  def loss(p, b):
    return jnp.mean(jnp.square(predict(p, b[0]) - b[1]))

  test = data(jax.random.PRNGKey(123), 1000)
  return Task(init=init, loss=loss, sample=lambda k: data(k, batch),
              evaluate=lambda p: loss(p, test), steps=steps)


class Task(NamedTuple):
  """A training problem: ``init(key)``, ``loss(params, batch)``,
  ``sample(key) -> batch``, ``evaluate(params) -> final loss``, ``steps``."""

  init: Callable
  loss: Callable
  sample: Callable
  evaluate: Callable
  steps: int


def train_task(task: Task, tx, seed=0):
  """Trains `task` with `tx` in one jitted scan.

  Returns ``(final loss, per-step losses, per-step metrics)``; the final loss
  is inf if training diverged.
  """

  def step(carry, key):
    params, state = carry
    loss, grads = jax.value_and_grad(task.loss)(params, task.sample(key))
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), (
        loss, clipkit.metrics(state))

  @jax.jit
  def run(key):
    params = task.init(key)
    keys = jax.random.split(jax.random.fold_in(key, 1), task.steps)
    (params, _), trace = jax.lax.scan(step, (params, tx.init(params)), keys)
    return task.evaluate(params), trace

  final, (losses, metrics) = run(jax.random.PRNGKey(seed))
  final = float(final)
  return (final if np.isfinite(final) else np.inf), losses, metrics


def strategies():
  """(name, clipping transformation or None) rows of the demo table."""
  return [
      ("no clipping", None),
      ("global_norm(1.0)", clipkit.global_norm(1.0)),
      ("per_leaf_norm(1.0)", clipkit.per_leaf_norm(1.0)),
      ("value(5.0)", clipkit.value(5.0)),
      ("adaptive()", clipkit.adaptive()),
      ("autoclip(max_norm=1.0)", clipkit.autoclip(max_norm=1.0)),
      ("zclip(max_norm=1.0)", clipkit.zclip(max_norm=1.0)),
      # The MLP's parameters are a list of layers: paths "0/w", "1/b", ...
      ("per_module(hidden: global_norm(1.0), output: value(5.0))",
       clipkit.per_module([("^0/", clipkit.global_norm(1.0), "hidden"),
                           ("^1/", clipkit.value(5.0), "output")])),
  ]


def main() -> None:
  x, y = make_regression()
  data = (x[:500], y[:500], x[500:], y[500:])
  print(__doc__.split("\n\n")[2].replace("\n", " "), "\n")
  print(f"targets: mean {y.mean():.1f}, std {y.std():.1f}\n")
  print("| clipping | train MSE | test MSE | seconds |")
  print("|---|---|---|---|")
  for name, clip in strategies():
    sgd = optax.sgd(0.01, momentum=0.9)
    tx = sgd if clip is None else optax.chain(clip, sgd)
    t0 = time.perf_counter()
    train_mse, test_mse, _ = train(tx, data)
    print(f"| {name} | {train_mse:.4g} | {test_mse:.4g} |"
          f" {time.perf_counter() - t0:.1f} |")


if __name__ == "__main__":
  main()
