"""The study's healthy tasks trained 5x longer: `adaptive()` against no clipping.

The 400-step study (`adaptive_study.py`) judges "does no harm" early in a
run. This script trains each healthy task of the study for 2,000 steps
(``--steps``), 10 seeds vmapped, with no clipping, `adaptive()` and
`zclip()`, and prints each one's median final loss over that of no
clipping, with the share of the second half's steps that `adaptive()` left
unclipped (``clip_scale == 1``).
Run: ``python benchmarks/long_healthy.py [--quick] [--steps N] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import adaptive_study as S  # pylint: disable=g-import-not-at-top,wrong-import-position
import adaptive_tasks as T  # pylint: disable=g-import-not-at-top,wrong-import-position

import optax_clipkit as clipkit  # pylint: disable=g-import-not-at-top,wrong-import-position

STRATEGIES = {"adaptive()": clipkit.adaptive, "zclip()": clipkit.zclip}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="one task with SGD, 30 steps, 2 seeds")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--seeds", type=int, default=10)
  args = parser.parse_args()
  steps, seeds = (30, 2) if args.quick else (args.steps, args.seeds)
  tasks = {k: t for k, t in {**T.design(steps), **T.held_out(steps)}.items()
           if not t.exploding}
  cells = [(k, o) for k in tasks for o in ("sgd", "adam")]
  if args.quick:
    cells = cells[:1]
  print(f"{_harness.machine()}; {steps} steps, {seeds} seeds\n")
  rows, t0 = [], time.perf_counter()
  no_state = {"x": jnp.zeros((1,))}
  for name, opt in cells:
    task = tasks[name]
    none, _ = S.train(task, opt, None, no_state, seeds)
    row = [f"{name} / {opt}", S.median(none[0])]
    for label, make in STRATEGIES.items():
      losses, tr = S.train(task, opt, lambda h, make=make: make(), no_state,
                           seeds, trace=label == "adaptive()")
      row.append(S.median(losses[0]) / S.median(none[0]))
      if tr is not None:
        scale = tr["clip_scale"][0]
        unclipped = float(np.mean(scale[:, scale.shape[1] // 2:] >= 1.0))
    rows.append(row + [unclipped])
    print(f"  {name} / {opt} done ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr, flush=True)
  print(_harness.table(
      ["task / optimizer", "no clipping (loss)"] + [
          f"{k} / no clipping" for k in STRATEGIES] + [
              "adaptive(): clip_scale == 1, second half"], rows))


if __name__ == "__main__":
  with jax.numpy_dtype_promotion("standard"):
    main()
