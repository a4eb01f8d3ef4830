"""Training tasks for the tests and the benchmarks (not part of the package).

- `make_regression`, `init_mlp`, `mlp`, `mse`: the exploding-gradient
  regression of ``python -m optax_clipkit.demo`` (20 features, 10
  informative, unscaled targets; an MLP 20-25-1 with ReLU).
- `Task`, `regression_task`, `adding_task`: problems for the
  exploding-gradient study (``benchmarks/exploding.py``, which trains them,
  seeds vmapped, in jitted `lax.scan`s) and the tests of the stateful
  strategies.
- `train`: one training run of a task (this module's or
  ``adaptive_tasks.py``'s) as one `lax.scan`, to jit or vmap.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


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


def regression_task(steps=2000, batch=32, standardize=False):
  """The demo's regression as a `Task` (random batches).

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


def adding_data(key, n, length):
  """The adding problem: sum the two values marked in a sequence."""
  kv, ki, kj = jax.random.split(key, 3)
  values = jax.random.uniform(kv, (n, length))
  i = jax.random.randint(ki, (n,), 0, length // 2)
  j = jax.random.randint(kj, (n,), length // 2, length)
  markers = jax.nn.one_hot(i, length) + jax.nn.one_hot(j, length)
  return jnp.stack([values, markers], -1), jnp.sum(values * markers, axis=1)


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

  data = functools.partial(adding_data, length=length)

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


def train(task, tx, key, record=None):
  """Trains `task` with `tx` from `key` in one `lax.scan`; traceable.

  Returns ``task.evaluate`` of the final parameters, and the per-step
  ``record(params, grads, state)`` stacked (parameters and gradients of the
  step, the state after its update), or None without `record`.
  """
  params = task.init(key)

  def step(carry, k):
    params, state = carry
    grads = jax.grad(task.loss)(params, task.sample(k))
    updates, state = tx.update(grads, state, params)
    out = None if record is None else record(params, grads, state)
    return (optax.apply_updates(params, updates), state), out

  keys = jax.random.split(jax.random.fold_in(key, 1), task.steps)
  (params, _), out = jax.lax.scan(step, (params, tx.init(params)), keys)
  return task.evaluate(params), out
