"""XLA:GPU's grouped global norm against one reduction per leaf, side by side.

On a single GPU, `_tactics.grouped_sums` reduces the small leaves of a tree
together for the global norm (see that module). This script times the same
code both ways in one process: as it runs on one GPU, and with each leaf
reduced alone (what it runs with several devices, and on TPU). It reports the
norm pass's read bandwidth (GB/s, best of 20 rounds) and the step time of
``chain(clipper, adamw)`` over AdamW alone (median of per-round ratios).
On a CPU neither column runs the grouped norm (the grouped one runs the CPU
code, the other the CPU code for several devices): the comparison means
nothing there.
Run: ``python benchmarks/grouped_norm.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import run as R  # pylint: disable=g-import-not-at-top,wrong-import-position

import optax_clipkit as clipkit  # pylint: disable=g-import-not-at-top,wrong-import-position
from optax_clipkit import _numerics  # pylint: disable=g-import-not-at-top,wrong-import-position
from optax_clipkit import _tactics  # pylint: disable=g-import-not-at-top,wrong-import-position


@contextlib.contextmanager
def per_leaf():
  """Traces inside see several devices: each leaf is reduced alone."""
  real = _tactics.single_device
  _tactics.single_device = lambda: False
  try:
    yield
  finally:
    _tactics.single_device = real


def leafwise(tx):
  """`tx`, traced with a reduction per leaf."""
  def update(updates, state, params=None, **extra):
    with per_leaf():
      return tx.update(updates, state, params, **extra)
  return optax.GradientTransformationExtraArgs(tx.init, update)


def norm_fn(grouped: bool):
  def f(tree):
    with contextlib.nullcontext() if grouped else per_leaf():
      return _numerics.global_norm(jax.tree.leaves(tree)).value
  return jax.jit(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a small tree")
  args = parser.parse_args()
  print(_harness.machine())
  trees = {
      "transformer 16.8M": lambda dt, s: R.transformer_tree(512, 4, 8192, dt, s),
      "64 leaves 16M": lambda dt, s: _harness.make_tree(64, 16_000_000, dt,
                                                        seed=s),
      "resnet 16.8M": lambda dt, s: R.resnet_tree(77, dt, s),
      "transformer 270M": lambda dt, s: R.transformer_tree(2048, 4, 32768, dt,
                                                           s),
  }
  if args.quick:
    trees = {"8 leaves 10k": lambda dt, s: _harness.make_tree(8, 10_000, dt,
                                                              seed=s)}
  rows = []
  for tname, make in trees.items():
    for dtype in (jnp.float32, jnp.bfloat16):
      tree = make(dtype, 1)
      nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
      fs = {"grouped": norm_fn(True), "per leaf": norm_fn(False),
            "optax": jax.jit(optax.global_norm)}
      rows.append([tname, jnp.dtype(dtype).name] + [
          nbytes / _harness.best_seconds(f, tree, rounds=3 if args.quick else 20)
          / 1e9 for f in fs.values()])
  print("\n## Norm pass, GB/s\n")
  print(_harness.table(["tree", "dtype", "grouped", "per leaf", "optax"], rows))
  rows = []
  for tname, make in trees.items():
    if "resnet" in tname:
      continue
    grads, params = make(jnp.float32, 1), make(jnp.float32, 2)
    adamw = lambda: optax.adamw(1e-3)
    cands = {
        "adamw": adamw(),
        "optax.clip_by_global_norm": optax.chain(
            optax.clip_by_global_norm(1.0), adamw()),
        "global_norm, grouped": optax.chain(clipkit.global_norm(1.0), adamw()),
        "global_norm, per leaf": leafwise(
            optax.chain(clipkit.global_norm(1.0), adamw())),
        "adaptive, grouped": optax.chain(clipkit.adaptive(), adamw()),
        "adaptive, per leaf": leafwise(
            optax.chain(clipkit.adaptive(), adamw())),
    }
    times = _harness.interleaved_times(cands, grads, params,
                                       rounds=3 if args.quick else 15)
    for name in cands:
      rows.append([tname, name, 1e3 * sorted(times[name])[len(times[name]) // 2],
                   _harness.median_ratio(times, name, "adamw")])
  print("\n## Step time (float32)\n")
  print(_harness.table(["tree", "step", "ms (median)", "vs adamw"], rows))


if __name__ == "__main__":
  with jax.numpy_dtype_promotion("standard"):
    main()
