"""The cost of `adaptive()` on a 16M-parameter AdamW step, interleaved.

Times ``adamw``, the same chained after optax's ``clip_by_global_norm(1)``,
after ``global_norm(1)`` and after ``adaptive()``, on a tree of 16M
parameters (``--params``) in 64 leaves, round by round in rotating order,
and reports each as a median ratio to AdamW and to ``global_norm(1)`` +
AdamW.
Run: ``python benchmarks/adaptive_overhead.py [--quick] [--params N]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness  # pylint: disable=g-import-not-at-top,wrong-import-position

import optax_clipkit as clipkit  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="100k parameters")
  parser.add_argument("--params", type=int, default=16_000_000,
                      help="parameters in the tree (default 16M)")
  args = parser.parse_args()
  n = 100_000 if args.quick else args.params
  tree = _harness.make_tree(64, n)
  grads = _harness.make_tree(64, n, seed=1)
  candidates = {
      "adamw": optax.adamw(1e-3),
      "optax.clip_by_global_norm(1) + adamw": optax.chain(
          optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
      "global_norm(1) + adamw": optax.chain(clipkit.global_norm(1.0),
                                            optax.adamw(1e-3)),
      "adaptive() + adamw": optax.chain(clipkit.adaptive(), optax.adamw(1e-3)),
  }
  times = _harness.interleaved_times(candidates, grads, tree,
                                     rounds=5 if args.quick else 15, inner=2)
  print(f"{_harness.machine()}; {_harness.n_params(tree):,} parameters\n")
  rows = [[name, 1e3 * sorted(t)[len(t) // 2],
           _harness.median_ratio(times, name, "adamw"),
           _harness.median_ratio(times, name, "global_norm(1) + adamw")]
          for name, t in times.items()]
  print(_harness.table(["step", "ms (median)", "vs adamw", "vs global_norm"],
                       rows))


if __name__ == "__main__":
  with jax.numpy_dtype_promotion("standard"):
    main()
