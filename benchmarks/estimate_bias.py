"""How far `adaptive()`'s loss estimate is from the true change of the loss.

Trains one task with `adaptive()` (or, with ``--no-clipping``, without it)
and records, every step, the parameters, the minibatch gradient and the
held-out loss. Then, over whole vectors and
in float64 (the rule reads a subset in float32), it forms the rule's
estimate of the loss change (the trapezoid rule, plain and less the step's
own minibatch noise as the rule estimates it, from the product of two
consecutive gradients: see `adaptive`'s docstring), the same less an
alternative estimate of that noise (the projection: half the squared
difference of two consecutive gradients, less its part along the last
step; see docs/adaptive.md), and compares their means with
the observed change of the held-out loss, both divided by the mean of
``|a| + |b|``, the scale of the rule's trend. A trend that reads a rise
where the loss is flat is a bias of the estimate, not a rise.

The gradient of the held-out loss, ``h_t``, stands in for the true
gradient: the minibatch noise of the last gradient is then
``xi_{t-1} = g_{t-1} - h_{t-1}``, and the estimate less the noise the step
actually carries, ``xi_{t-1} . d_t``, is what a perfect noise estimate
would read. A second table splits the product's noise estimate,
``|g_{t-1}|^2 - max(g_{t-1} . g_{t-2}, 0)``, into the noise
``|xi_{t-1}|^2`` and the change of the true gradient over the last step,
``h_{t-1} . (h_{t-1} - h_{t-2})``, which it holds too.

Run: ``python benchmarks/estimate_bias.py [--task control] [--optimizer
adam] [--steps 2000] [--seed 0] [--no-clipping] [--quick]``; ``--task`` is
``control`` (the regression with standardised targets of
``benchmarks/exploding.py``, with its learning rates) or a task of
``benchmarks/adaptive_study.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
# pylint: disable=g-import-not-at-top,wrong-import-position
import adaptive_study
import adaptive_tasks
import exploding
import tasks

import optax_clipkit as clipkit


def record(task, opt, seed: int, clip: bool = True):
  """Parameters, gradients, held-out losses and their gradients of every
  step (float64).

  Trained with `adaptive()` before `opt`, or with `opt` alone (`clip`
  False): the estimates are the same functions of the run either way.
  """
  tx = optax.chain(clipkit.adaptive(), opt) if clip else opt

  def record_step(params, grads, state):
    del state
    return (ravel_pytree(params)[0], ravel_pytree(grads)[0],
            task.evaluate(params),
            ravel_pytree(jax.grad(task.evaluate)(params))[0])

  _, out = jax.jit(lambda key: tasks.train(task, tx, key, record_step))(
      jax.random.PRNGKey(seed))
  return [np.asarray(x, np.float64) for x in out]


def changes(p, g, loss, h):
  """Per step t >= 3: the observed change; the plain estimate, and less the
  product's noise (the rule's), the projection's and the true noise; the
  scale |a| + |b|; then the product's noise estimate and its two parts,
  |xi_{t-1}|^2 and h_{t-1} . (h_{t-1} - h_{t-2})."""
  rows = []
  for t in range(3, len(loss)):
    d, d1 = p[t] - p[t - 1], p[t - 1] - p[t - 2]
    g1, g2 = g[t - 1], g[t - 2]
    a, b = -g1 @ d, g[t] @ d
    # Least squares: d ~ beta * d1 - eta * g1.
    (_, eta), *_ = np.linalg.lstsq(np.stack([d1, -g1], 1), d, rcond=None)
    eta = max(eta, 0.0)
    nu = g1 @ g1 - max(g1 @ g2, 0.0)  # The product's noise estimate.
    product = eta * nu
    dg = g1 - g2
    along = (dg @ d1) ** 2 / max(d1 @ d1, np.finfo(np.float64).tiny)
    projection = eta * max(dg @ dg - along, 0.0) / 2
    xi = g1 - h[t - 1]  # The minibatch noise of g_{t-1}.
    rows.append((loss[t] - loss[t - 1], (b - a) / 2, (b - a + product) / 2,
                 (b - a + projection) / 2, (b - a - xi @ d) / 2,
                 abs(a) + abs(b), nu, xi @ xi,
                 h[t - 1] @ (h[t - 1] - h[t - 2])))
  return np.array(rows)


def report(rows, loss, windows) -> str:
  out = ["| steps | held-out loss | observed | plain estimate | less the"
         " product | less the projection | less the true noise |",
         "|---|---|---|---|---|---|---|"]
  parts = ["| steps | the product's noise estimate | the noise, xi . xi |"
           " the true gradient's change, h . (h - h_prev) |",
           "|---|---|---|---|"]
  for lo, hi in windows:
    w = rows[lo - 3:hi - 3]
    if not len(w):
      continue
    scale = w[:, 5].mean() / 2  # The estimates are (b - a) / 2.
    out.append(f"| {lo}-{hi} | {loss[lo]:.3g} to {loss[hi - 1]:.3g} | "
               + " | ".join(f"{w[:, i].mean() / scale:+.3f}" for i in range(5))
               + " |")
    parts.append(f"| {lo}-{hi} | " + " | ".join(
        f"{w[:, i].mean():.3g}" for i in (6, 7, 8)) + " |")
  return "\n".join(out) + "\n\nMeans per step, before the fit's eta:\n\n" + (
      "\n".join(parts))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--task", default="control")
  parser.add_argument("--optimizer", default="adam", choices=("sgd", "adam"))
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true",
                      help="200 steps: a smoke run")
  parser.add_argument("--no-clipping", action="store_true",
                      help="train with the optimizer alone")
  args = parser.parse_args()
  steps = 200 if args.quick else args.steps
  if args.task == "control":
    task = tasks.regression_task(steps=steps, standardize=True)
    opt = exploding.optimizer("control", args.optimizer)
  else:
    study = {**adaptive_tasks.design(steps), **adaptive_tasks.held_out(steps)}
    if args.task not in study:
      parser.error(f"--task must be control or one of {sorted(study)},"
                   f" got {args.task!r}")
    task = study[args.task]
    opt = adaptive_study.optimizer(task, args.optimizer)
  with jax.numpy_dtype_promotion("standard"):
    p, g, loss, h = record(task, opt, args.seed, clip=not args.no_clipping)
  rows = changes(p, g, loss, h)
  edges = [3, 50, 100, 200] + list(range(300, steps + 1, 300))
  windows = [(lo, hi) for lo, hi in zip(edges, edges[1:] + [steps])
             if lo < hi]
  trained = "no clipping" if args.no_clipping else "adaptive()"
  print(f"{args.task} / {args.optimizer} with {trained}, seed {args.seed},"
        f" {steps} steps:"
        " mean changes per step over each window, divided by half the mean"
        " |a| + |b| (the trend's scale)\n")
  print(report(rows, loss, windows))


if __name__ == "__main__":
  main()
