"""`adaptive()` with optimizers outside the study: Lion, RMSProp, Muon, ...

The study's tasks (`adaptive_tasks`: design, held out and the later families,
but the CNN and the GPT, which are slow) with `optax.lion` (a third of the
task's Adam rate), `optax.rmsprop` (Adam's rate) and `optax.sgd` without
momentum at ten times the rate the study gives SGD with momentum 0.9 (the
same step in the long run); ``--optimizers`` picks others of
`adaptive_study.OTHER_OPTIMIZERS` (AdamW with a weight decay of 0.1, LAMB,
Muon, Adafactor, ...) or the study's own (sgd, adam). 400 steps, 10 seeds
vmapped, as in the study; ``--multisteps K`` chains every strategy before
``optax.MultiSteps`` of K calls (400 calls, 400 / K steps).
Each cell prints `adaptive()`, `zclip()` and `autoclip()` against no
clipping (healthy tasks, where no clipping stays finite) or against the best
fixed threshold of the grid (the others), then each fixed threshold of the
grid against the same reference.

Run: ``python benchmarks/other_optimizers.py [--only TASK] [--kind
healthy|exploding] [--optimizers lion,rmsprop] [--first-seed N]
[--multisteps K] [--quick]``
(``--quick``: 60 steps, 2 seeds, a smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adaptive_study as S  # pylint: disable=g-import-not-at-top,wrong-import-position
import adaptive_tasks  # pylint: disable=g-import-not-at-top,wrong-import-position

import optax_clipkit as clipkit  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT = ("lion", "rmsprop", "sgd-plain")
OPTIMIZERS = S.OPTIMIZERS + tuple(S.OTHER_OPTIMIZERS)  # The study's too.
ARMS = {"adaptive()": clipkit.adaptive, "zclip()": clipkit.zclip,
        "autoclip()": clipkit.autoclip}
SLOW = ("cnn", "char-gpt")
KINDS = ("healthy", "exploding")  # Indexed by `task.exploding`.


def cell(task, opt, seeds=10):
  """One line of the table: each arm's ratio, diverged seeds, the grid's."""
  out, _ = S.run_cell(task, opt, seeds, {"no clipping": None, **ARMS})
  none = S.median(np.array(out["no clipping"]))
  best = min(S.median(np.array(g)) for g in out["grid"].values())
  ref = none if not task.exploding and np.isfinite(none) else best
  parts = []
  for name in ARMS:
    losses = np.array(out[name])
    div = int(np.sum(~np.isfinite(losses)))
    parts.append(f"{name} {S.fmt(S.median(losses) / ref)}"
                 + (f" ({div} diverged)" if div else ""))
  what = "no clipping" if ref == none else "best fixed"
  grid = ", ".join(f"{c} {S.fmt(S.median(np.array(g)) / ref)}"
                   for c, g in out["grid"].items())
  return f"against {what}: " + ", ".join(parts) + f"; fixed: {grid}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default=None, help="one task")
  parser.add_argument("--kind", choices=KINDS,
                      default=None, help="only the tasks of this kind")
  parser.add_argument("--optimizers", default=",".join(DEFAULT),
                      help=f"comma-separated, of: {', '.join(OPTIMIZERS)}")
  parser.add_argument("--first-seed", type=int, default=0,
                      help="seeds are first-seed, first-seed + 1, ...")
  parser.add_argument("--multisteps", type=int, default=1,
                      help="accumulate this many gradients per step "
                      "(optax.MultiSteps after every strategy)")
  parser.add_argument("--quick", action="store_true",
                      help="60 steps, 2 seeds: a smoke run")
  args = parser.parse_args()
  steps, seeds = (60, 2) if args.quick else (400, 10)
  tasks = {**adaptive_tasks.design(steps), **adaptive_tasks.held_out(steps),
           **adaptive_tasks.families(steps)}
  if args.only is not None and args.only not in tasks:
    parser.error(f"--only: no task named {args.only!r}")
  if args.only in SLOW:
    parser.error(f"--only: {args.only!r} is too slow for this script")
  of_kind = lambda task: args.kind in (None, KINDS[task.exploding])
  if args.only is not None and not of_kind(tasks[args.only]):
    parser.error(f"--only: {args.only!r} is not a task of --kind {args.kind}")
  opts = args.optimizers.split(",")
  if set(opts) - set(OPTIMIZERS):
    parser.error(f"--optimizers: unknown {sorted(set(opts) - set(OPTIMIZERS))}")
  if args.multisteps < 1:
    parser.error(f"--multisteps: must be at least 1, got {args.multisteps}")
  S.FIRST_SEED, S.MULTISTEPS = args.first_seed, args.multisteps
  with jax.numpy_dtype_promotion("standard"):
    for name, task in tasks.items():
      if name in SLOW or args.only not in (None, name):
        continue
      if not of_kind(task):
        continue
      for opt in opts:
        print(f"{name} / {opt}: {cell(task, opt, seeds)}", flush=True)


if __name__ == "__main__":
  main()
