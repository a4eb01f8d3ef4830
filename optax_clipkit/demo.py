"""Exploding gradients, and each clipping strategy fixing them.

Run: ``python -m optax_clipkit.demo``.

A regression whose targets are not standardised (their standard deviation is
about 180), fitted by an MLP (20-25-1, ReLU) with SGD (learning rate 0.01,
momentum 0.9, batches of 32, 100 epochs of 500 samples). The first gradients
are huge: without clipping the loss is NaN within a few steps. With any of
clipkit's strategies it trains.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_clipkit as clipkit


def make_data(n=1000, features=20, informative=10, seed=1):
  """Gaussian features and a sparse linear target, like scikit-learn's."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, features)).astype(np.float32)
  w = np.zeros(features, np.float32)
  w[:informative] = 100 * rng.uniform(size=informative)
  y = (x @ w + 0.1 * rng.standard_normal(n)).astype(np.float32)
  return x, y


def init_mlp(key, sizes=(20, 25, 1)):
  """He-uniform weights, zero biases: a list of {"w", "b"} layers."""
  params = []
  for k, n_in, n_out in zip(jax.random.split(key, len(sizes) - 1),
                            sizes[:-1], sizes[1:]):
    lim = np.sqrt(6.0 / n_in)
    params.append({"w": jax.random.uniform(k, (n_in, n_out), minval=-lim,
                                           maxval=lim),
                   "b": jnp.zeros((n_out,))})
  return params


def mse(params, x, y):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"][None])
  out = x @ params[-1]["w"] + params[-1]["b"][None]
  return jnp.mean(jnp.square(out[:, 0] - y))


def train(clip, x, y, epochs=100, batch=32, seed=0):
  """SGD with momentum after `clip` (or none); returns (params, opt state)."""
  sgd = optax.sgd(0.01, momentum=0.9)
  tx = optax.chain(sgd) if clip is None else optax.chain(clip, sgd)
  steps_per_epoch = len(x) // batch

  def step(carry, idx):
    params, state = carry
    loss, grads = jax.value_and_grad(mse)(params, x[idx], y[idx])
    # params: adaptive() estimates the loss change from the step taken;
    # loss: adaptive() and skip_spikes read it, the others ignore it.
    updates, state = tx.update(grads, state, params, loss=loss)
    return (optax.apply_updates(params, updates), state), None

  @jax.jit
  def run(key):
    params = init_mlp(key)
    keys = jax.random.split(jax.random.fold_in(key, 1), epochs)
    order = jax.vmap(lambda k: jax.random.permutation(k, len(x)))(keys)
    batches = order[:, :steps_per_epoch * batch].reshape(-1, batch)
    carry, _ = jax.lax.scan(step, (params, tx.init(params)), batches)
    return carry

  return run(jax.random.PRNGKey(seed))


# Each strategy with its customary setting for this problem.
STRATEGIES = {
    "no clipping": None,
    "global_norm(1.0)": clipkit.global_norm(1.0),
    "per_leaf_norm(1.0)": clipkit.per_leaf_norm(1.0),
    "value(5.0)": clipkit.value(5.0),
    "adaptive()": clipkit.adaptive(),
    "autoclip(max_norm=1.0)": clipkit.autoclip(max_norm=1.0),
    "zclip(max_norm=1.0)": clipkit.zclip(max_norm=1.0),
    # The MLP's parameters are a list of layers: paths "0/w", "1/b", ...
    "per_module(hidden: global_norm(1.0), output: value(5.0))":
        clipkit.per_module([("^0/", clipkit.global_norm(1.0), "hidden"),
                            ("^1/", clipkit.value(5.0), "output")]),
}


def main() -> None:
  x, y = map(jnp.asarray, make_data())
  (x_train, x_test), (y_train, y_test) = jnp.split(x, 2), jnp.split(y, 2)
  print(__doc__.split("\n\n")[2].replace("\n", " "), "\n")
  print("| clipping | train MSE | test MSE | seconds |")
  print("|---|---|---|---|")
  for name, clip in STRATEGIES.items():
    t0 = time.perf_counter()
    params, _ = train(clip, x_train, y_train)
    print(f"| {name} | {float(mse(params, x_train, y_train)):.4g} |"
          f" {float(mse(params, x_test, y_test)):.4g} |"
          f" {time.perf_counter() - t0:.1f} |")


if __name__ == "__main__":
  main()
