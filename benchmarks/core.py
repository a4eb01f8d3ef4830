"""Step time and compile time of the core clippers against optax's.

Run: ``python benchmarks/core.py`` (``--quick`` for a smoke run).

Step time: ``chain(clipper, adamw)`` on a 200-leaf, 16M-parameter float32
tree, against ``chain(optax equivalent, adamw)`` and ``adamw`` alone, with
interleaved rounds and medians of per-round ratios. Compile time: the same
steps on a 1,000-leaf tree, each compiled from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import optax

sys.path.insert(0, os.path.dirname(__file__))
import _harness  # pylint: disable=g-import-not-at-top,wrong-import-position

import optax_clipkit as clipkit  # pylint: disable=g-import-not-at-top


def pairs(with_adamw: bool):
  """(name, clipkit transform, optax equivalent) triples."""
  tail = (optax.adamw(1e-3),) if with_adamw else ()

  def c(t):
    return optax.chain(t, *tail) if tail else t

  return [
      ("global_norm", c(clipkit.global_norm(1.0)),
       c(optax.clip_by_global_norm(1.0))),
      ("per_leaf_norm", c(clipkit.per_leaf_norm(1.0)),
       # optax has no per-leaf norm clipper; clip_by_block_rms is the
       # closest per-leaf rule (an RMS, not a norm: the same work).
       c(optax.clip_by_block_rms(1.0))),
      ("value", c(clipkit.value(1.0)), c(optax.clip(1.0))),
      ("value_counted", c(clipkit.value(1.0, count_clipped=True)),
       c(optax.clip(1.0))),
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json", default=None, help="write results here")
  args = parser.parse_args()

  n_params = 1_000_000 if args.quick else 16_000_000
  leaves = 20 if args.quick else 200
  compile_leaves = 50 if args.quick else 1000
  rounds = 3 if args.quick else 15
  results = {"machine": _harness.machine(), "step": [], "compile": []}
  print(f"machine: {results['machine']}\n")

  grads = _harness.make_tree(leaves, n_params, seed=1, scale=10.0)
  params = _harness.make_tree(leaves, n_params, seed=2)
  print(f"## Step time: {leaves} leaves, "
        f"{_harness.n_params(grads) / 1e6:.1f}M float32 params\n")
  rows = []
  for with_adamw in (False, True):
    for name, ours, theirs in pairs(with_adamw):
      cands = {"clipkit": ours, "optax": theirs}
      if with_adamw:
        cands["adamw"] = optax.adamw(1e-3)
      times = _harness.interleaved_times(cands, grads, params, rounds=rounds)
      ms = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
      row = {
          "strategy": name + (" + adamw" if with_adamw else ""),
          "clipkit_ms": ms["clipkit"],
          "optax_ms": ms["optax"],
          "ratio_vs_optax": _harness.median_ratio(times, "clipkit", "optax"),
          "ratio_vs_adamw": (_harness.median_ratio(times, "clipkit", "adamw")
                             if with_adamw else None),
      }
      results["step"].append(row)
      rows.append(list(row.values()))
  print(_harness.table(["strategy", "clipkit ms", "optax ms",
                        "clipkit/optax", "clipkit/adamw"], rows))

  tree = _harness.make_tree(compile_leaves, 100_000, seed=3)
  print(f"\n## Compile time: {compile_leaves} leaves\n")
  rows = []
  for with_adamw in (False, True):
    for name, ours, theirs in pairs(with_adamw)[:1 if with_adamw else 4]:
      a = _harness.compile_seconds(ours, tree)
      b = _harness.compile_seconds(theirs, tree)
      row = {"strategy": name + (" + adamw" if with_adamw else ""),
             "clipkit_s": a, "optax_s": b, "ratio": a / b}
      results["compile"].append(row)
      rows.append(list(row.values()))
  print(_harness.table(["strategy", "clipkit s", "optax s", "ratio"], rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
