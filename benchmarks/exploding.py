"""Exploding-gradient tasks: adaptive strategies against fixed thresholds.

Three tasks: the regression with unscaled targets and a vanilla tanh RNN on
the adding problem through 30 steps (both from `tasks.py`), and a
Flax LSTM with a dense head on the same adding problem; each trained with SGD
+ momentum and with Adam. Every strategy is compared with a grid of
fixed global-norm thresholds (0.1 to 10) chosen in hindsight: the figure is
final loss / best fixed-threshold loss, the median over seeds (inf means
diverged). Run: ``python benchmarks/exploding.py [--quick] [--json F]``;
``--seeds N`` and ``--only TASK`` (for example ``--only control --seeds
30``) check one task's figures on more seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position

import optax_clipkit as clipkit  # pylint: disable=g-import-not-at-top

GRID = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Seeds per cell of the full run: one run moves 2-10x with the seed.
SEEDS = 10
# Seeds vmapped together. On a 2-core x86_64 CPU with jax 0.10.2 (2026-11-26)
# the LSTM cell vmapped over 8 or 10 seeds stalled (over 5 minutes, CPU
# idle) where 5 took 4 s.
_GROUP = 5
OPTIMIZERS = {
    # (task, optimizer) -> learning rate; SGD's are large enough that it
    # diverges without clipping.
    ("regression", "sgd"): 0.01,
    ("regression", "adam"): 0.03,
    ("adding", "sgd"): 0.1,
    ("adding", "adam"): 0.003,
    ("lstm", "sgd"): 1.0,
    ("lstm", "adam"): 0.01,
    # A control: the same regression with standardised targets, where
    # nothing explodes and clipping can only get in the way.
    ("control", "sgd"): 0.01,
    ("control", "adam"): 0.03,
}
STRATEGIES = {
    "no clipping": lambda: None,
    "adaptive()": clipkit.adaptive,
    "autoclip()": clipkit.autoclip,
    "autoclip(max_norm=1)": lambda: clipkit.autoclip(max_norm=1.0),
    "zclip()": clipkit.zclip,
    "zclip(max_norm=1)": lambda: clipkit.zclip(max_norm=1.0),
}


class _LSTM(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.RNN(nn.OptimizedLSTMCell(32))(x)
    return nn.Dense(1)(h[:, -1])[:, 0]


def lstm_task(steps):
  """An LSTM (32 units) with a dense head on the adding problem (30 steps)."""
  adding = tasks.adding_task(steps=steps)
  model = _LSTM()
  keys = jax.random.split(jax.random.PRNGKey(123), 16)
  test = jax.tree.map(lambda *b: jnp.concatenate(b),
                      *[adding.sample(k) for k in keys])

  def loss(params, batch):
    return jnp.mean(jnp.square(model.apply(params, batch[0]) - batch[1]))

  return tasks.Task(init=lambda key: model.init(key, test[0][:1]), loss=loss,
                   sample=adding.sample, evaluate=lambda p: loss(p, test),
                   steps=steps)


def optimizer(task: str, name: str):
  lr = OPTIMIZERS[(task, name)]
  return optax.sgd(lr, momentum=0.9) if name == "sgd" else optax.adam(lr)


def final_losses(task, clip, opt, seeds: int) -> np.ndarray:
  """Final losses of seeds 0 .. `seeds` - 1 (inf where diverged).

  The seeds run vmapped in jitted scans, `_GROUP` at a time, each from
  `jax.random.PRNGKey(seed)`.
  """
  tx = opt if clip is None else optax.chain(clip, opt)
  batch = jax.jit(jax.vmap(lambda key: tasks.train(task, tx, key)[0]))
  final = np.concatenate([
      np.asarray(batch(jax.vmap(jax.random.PRNGKey)(
          jnp.arange(s, min(s + _GROUP, seeds)))), np.float64)
      for s in range(0, seeds, _GROUP)])
  return np.where(np.isfinite(final), final, np.inf)


def study(seeds: int, steps: int, only: str | None = None) -> dict:
  cells = {"regression": tasks.regression_task(steps=steps),
           "adding": tasks.adding_task(steps=steps),
           "lstm": lstm_task(steps),
           "control": tasks.regression_task(steps=steps, standardize=True)}
  rows = {}
  for (tname, oname) in OPTIMIZERS:
    if only is not None and tname != only:
      continue
    task, opt = cells[tname], optimizer(tname, oname)
    grid = np.stack([final_losses(task, clipkit.global_norm(c), opt, seeds)
                     for c in GRID], axis=1)
    best = np.nanmin(np.median(grid, axis=0))
    row = {"best fixed": GRID[int(np.nanargmin(np.median(grid, axis=0)))],
           "best loss": float(best)}
    for name, make in STRATEGIES.items():
      losses = final_losses(task, make(), opt, seeds)
      row[name] = float(np.median(losses)) / best
    rows[f"{tname} / {oname}"] = row
    print(f"  {tname} / {oname} done", flush=True)
  return rows


def table(rows: dict) -> str:
  names = [n for n in next(iter(rows.values()))
           if n not in ("best fixed", "best loss")]
  out = ["| task / optimizer | best fixed (loss) | " + " | ".join(names) + " |",
         "|---|---|" + "---|" * len(names)]
  for key, row in rows.items():
    cells = [f"{row[n]:.3g}x" if np.isfinite(row[n]) else "diverged"
             for n in names]
    out.append(f"| {key} | {row['best fixed']} ({row['best loss']:.3g}) | "
               + " | ".join(cells) + " |")
  exploding = [row for key, row in rows.items() if not key.startswith("control")]
  if not exploding:
    return "\n".join(out)
  summary = []
  for n in names:
    r = np.array([row[n] for row in exploding])
    summary.append(f"{np.median(r):.2f}x / {np.max(r):.2f}x"
                   if np.all(np.isfinite(r)) else "diverges")
  out.append("| median / worst (exploding tasks) | | " + " | ".join(summary)
             + " |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="one seed, 300 steps: a smoke run")
  parser.add_argument("--json", help="write the results to this file")
  parser.add_argument("--seeds", type=int,
                      help=f"seeds per cell (default {SEEDS}; 1 with --quick)")
  parser.add_argument("--only", choices=sorted({t for t, _ in OPTIMIZERS}),
                      help="run this task only")
  args = parser.parse_args()
  seeds, steps = (1, 300) if args.quick else (SEEDS, 2000)
  if args.seeds is not None:
    if args.seeds < 1:
      parser.error(f"--seeds must be at least 1, got {args.seeds}")
    seeds = args.seeds
  with jax.numpy_dtype_promotion("standard"):
    rows = study(seeds, steps, args.only)
  print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
