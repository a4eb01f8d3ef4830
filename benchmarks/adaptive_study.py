"""`adaptive()`, with and without the loss, against the alternatives.

The alternatives: no clipping, fixed thresholds, AutoClip and ZClip; the
``adaptive(), loss=`` arm passes the minibatch loss, ``loss=loss``.

Each (task, optimizer) cell is trained with every strategy, 10 seeds vmapped
inside one jitted `lax.scan` (the fixed-threshold grid vmapped too). Scores
are medians over seeds of the final held-out loss:

- exploding tasks: loss / the best fixed global-norm threshold in hindsight
  (grid 0.1 to 10, the threshold with the lowest median);
- healthy tasks: loss / no clipping.

The tasks live in ``adaptive_tasks.py``, split into the design tasks the rule
was tuned on and held-out tasks that only report. The script prints the full
table and the five goals of the rule as met or missed, and writes JSON.

Run: ``python benchmarks/adaptive_study.py [--quick] [--json F]``;
``--only TASK --steps 2000`` trains one task's cells five times longer;
``--families`` runs the families added after the rule was designed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))  # This checkout's optax_clipkit.
import adaptive_tasks  # pylint: disable=g-import-not-at-top,wrong-import-position

import optax_clipkit as clipkit  # pylint: disable=g-import-not-at-top,wrong-import-position

GRID = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
OPTIMIZERS = ("sgd", "adam")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "results_adaptive.json")
# Strategies: name -> factory of the clipping transformation (None: none).
STRATEGIES = {
    "no clipping": None,
    "adaptive()": clipkit.adaptive,
    "adaptive(), loss=": clipkit.adaptive,
    "autoclip()": clipkit.autoclip,
    "zclip()": clipkit.zclip,
}


# Optimizers outside the study (other_optimizers.py): name -> the optimizer,
# from the task's rates (Adam's for adaptive methods, SGD's for SGD, scaled
# where noted).
OTHER_OPTIMIZERS = {
    "lion": lambda lr: optax.lion(lr["adam"] / 3),
    "rmsprop": lambda lr: optax.rmsprop(lr["adam"]),
    # No momentum, the step of momentum 0.9's: an aggressive rate.
    "sgd-plain": lambda lr: optax.sgd(10 * lr["sgd"]),
    "adamw": lambda lr: optax.adamw(lr["adam"], weight_decay=0.1),
    "adamw-wd-0.01": lambda lr: optax.adamw(lr["adam"], weight_decay=0.01),
    "adamw-b2-0.95": lambda lr: optax.adamw(lr["adam"], b2=0.95,
                                            weight_decay=0.1),
    "nadam": lambda lr: optax.nadam(lr["adam"]),
    "adabelief": lambda lr: optax.adabelief(lr["adam"]),
    "yogi": lambda lr: optax.yogi(lr["adam"]),
    "adan": lambda lr: optax.adan(lr["adam"]),
    "adagrad": lambda lr: optax.adagrad(3 * lr["adam"]),
    "sm3": lambda lr: optax.sm3(3 * lr["adam"]),
    "adafactor": lambda lr: optax.adafactor(lr["adam"]),
    "lamb": lambda lr: optax.lamb(lr["adam"]),
    "muon": lambda lr: optax.contrib.muon(lr["adam"]),
    "rmsprop-momentum": lambda lr: optax.rmsprop(lr["adam"] / 3,
                                                 momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr["sgd"], momentum=0.9, nesterov=True),
    "sgd-momentum-0.99": lambda lr: optax.sgd(lr["sgd"] / 10, momentum=0.99),
    "sgd-plain-1x": lambda lr: optax.sgd(lr["sgd"]),
}


def optimizer(task, name):
  if name in OTHER_OPTIMIZERS:
    return OTHER_OPTIMIZERS[name](task.lr)
  lr = task.lr[name]
  if task.schedule == "warmup_cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(task.steps // 10, 1), task.steps, lr / 10)
    if name == "adam":
      return optax.adamw(lr, weight_decay=0.1)
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  return optax.adam(lr)


# Strategies whose update is passed the minibatch loss, ``loss=loss``.
PASS_LOSS = ("adaptive(), loss=",)


# The first seed; `--first-seed` moves it to check a result on fresh seeds.
FIRST_SEED = 0
# Gradient accumulation: above 1, `optax.MultiSteps` of that many calls over
# the optimizer, every strategy chained before it (other_optimizers.py's
# `--multisteps`).
MULTISTEPS = 1


def train(task, opt_name, make_clip, hparams, seeds, trace=False,
          pass_loss=False):
  """Final losses [len(hparams), seeds] (inf where diverged), and traces.

  `make_clip(h)` builds the clipping transformation from one entry of the
  hyperparameters `hparams` (a pytree of arrays with a leading axis), or is
  None for no clipping. Everything runs as one jitted, vmapped scan.
  """
  opt = optimizer(task, opt_name)
  if MULTISTEPS > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=MULTISTEPS)

  def one(h, seed):
    clip = None if make_clip is None else make_clip(h)
    tx = opt if clip is None else optax.chain(clip, opt)
    key = jax.random.PRNGKey(seed)
    params = task.init(key)
    state = tx.init(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), task.steps)

    def step(carry, k):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, task.sample(k))
      extra = {"loss": loss} if pass_loss else {}
      updates, state = tx.update(grads, state, params, **extra)
      params = optax.apply_updates(params, updates)
      out = {"loss": loss}
      if trace:
        out.update(clipkit.metrics(state))
      return (params, state), out

    (params, _), tr = jax.lax.scan(step, (params, state), keys)
    return task.evaluate(params), (tr if trace else None)

  n_h = jax.tree.leaves(hparams)[0].shape[0]
  hs = jax.tree.map(lambda x: jnp.repeat(x, seeds, axis=0), hparams)
  ss = jnp.tile(jnp.arange(seeds) + FIRST_SEED, n_h)
  final, tr = jax.jit(jax.vmap(one))(hs, ss)
  final = np.asarray(final, np.float64).reshape(n_h, seeds)
  final = np.where(np.isfinite(final), final, np.inf)
  if trace:
    tr = jax.tree.map(lambda x: np.asarray(x).reshape(n_h, seeds, -1), tr)
  return final, tr


def median(x):
  """Median over seeds where a diverged seed counts as +inf."""
  return float(np.median(np.where(np.isfinite(x), x, np.inf)))


def run_cell(task, opt, seeds, strategies):
  """All strategies on one (task, optimizer): medians and per-seed losses."""
  out = {}
  grid, _ = train(task, opt, lambda c: clipkit.global_norm(c),
                  jnp.asarray(GRID), seeds)
  out["grid"] = {str(c): grid[i].tolist() for i, c in enumerate(GRID)}
  trace = None
  for name, factory in strategies.items():
    if factory is None:
      losses, _ = train(task, opt, None, jnp.zeros((1,)), seeds)
    else:
      losses, tr = train(task, opt, lambda _, f=factory: f(),
                         jnp.zeros((1,)), seeds, trace=name == "adaptive()",
                         pass_loss=name in PASS_LOSS)
      if name == "adaptive()":
        trace = {k: v[0] for k, v in tr.items()}
    out[name] = losses[0].tolist()
  return out, trace


def score(cell, exploding):
  """Per-strategy ratios (median over seeds) against the cell's reference."""
  medians = {c: median(np.array(v)) for c, v in cell["grid"].items()}
  best = min(medians, key=medians.get)
  ref = medians[best] if exploding else median(np.array(cell["no clipping"]))
  ratios = {f"fixed {c}": m / ref for c, m in medians.items()}
  for name in STRATEGIES:
    ratios[name] = median(np.array(cell[name])) / ref
  diverged = {name: int(np.sum(~np.isfinite(np.array(cell[name]))))
              for name in STRATEGIES}
  return {"best fixed": float(best), "reference": ref, "ratios": ratios,
          "diverged seeds": diverged}


def fmt(r):
  return f"{r:.3g}x" if np.isfinite(r) else "diverged"


def table(scores):
  cols = [f"fixed {c}" for c in GRID] + list(STRATEGIES)
  lines = ["| split | task / optimizer | kind | reference | "
           + " | ".join(cols) + " |", "|---|---|---|---|" + "---|" * len(cols)]
  for key, s in scores.items():
    kind = "exploding" if s["exploding"] else "healthy"
    ref = (f"best fixed {s['best fixed']:g}: {s['reference']:.3g}"
           if s["exploding"] else f"no clipping: {s['reference']:.3g}")
    lines.append(f"| {s['split']} | {key} | {kind} | {ref} | "
                 + " | ".join(fmt(s["ratios"][c]) for c in cols) + " |")
  return "\n".join(lines)


def goals(scores, clip_fraction, name="adaptive()"):
  """The goals for the strategy `name`, met or missed, with numbers.

  Goal 4 needs `clip_fraction`, which the study records for `adaptive()`
  only; pass {} for another strategy.
  """
  out = {}
  for split in ("design", "held-out", "all"):
    rows = [s for s in scores.values() if split in ("all", s["split"])]
    if not rows:
      continue
    exp = [s for s in rows if s["exploding"]]
    hea = [s for s in rows if not s["exploding"]]
    div = sum(s["diverged seeds"][name] for s in exp)
    r_exp = np.array([s["ratios"][name] for s in exp])
    r_hea = np.array([s["ratios"][name] for s in hea])
    fr = [clip_fraction.get(k) for k, s in scores.items()
          if not s["exploding"] and split in ("all", s["split"])]
    fr = [f for f in fr if f is not None]
    g = {}
    g["1 never diverges"] = (div == 0, f"{div} diverged seeds")
    if len(r_exp):
      med, worst = float(np.median(r_exp)), float(np.max(r_exp))
      g["2 rescues"] = (med <= 1.25 and worst <= 2.0,
                        f"median {med:.3g}x, worst {worst:.3g}x of best fixed")
    if len(r_hea):
      worst = float(np.max(r_hea))
      g["3 no harm"] = (worst <= 1.25,
                        f"worst {worst:.3g}x of no clipping, median "
                        f"{float(np.median(r_hea)):.3g}x")
    if fr:
      g["4 reads truthfully"] = (
          min(fr) >= 0.5,
          f"healthy runs, second half: clip_scale == 1 on at least "
          f"{100 * min(fr):.0f}% of steps (median {100 * np.median(fr):.0f}%)")
    out[split] = g
  return out


TRACE_CELLS = (("regression", "sgd"), ("adding-rnn", "sgd"),
               ("adding-lstm", "sgd"), ("regression-std", "sgd"),
               ("healthy-lstm", "sgd"), ("healthy-lstm", "adam"))


def trace_table(task, tr):
  """Medians over seeds of what `adaptive()` saw and did, at a few steps."""
  steps = [i for i in (0, 1, 2, 5, 10, 20, 30, 50, 100, 200, 300, 400, 599)
           if i < task.steps]
  lines = ["| step | loss | grad_norm | clip_threshold | clip_scale |"
           " loss_trend | clip_cause (seeds: none/start/overshoot/spike) |",
           "|---|---|---|---|---|---|---|"]
  for i in steps:
    med = {k: float(np.median(v[:, i])) for k, v in tr.items()}
    causes = np.bincount(tr["clip_cause"][:, i].astype(int), minlength=5)
    lines.append(
        f"| {i} | {med['loss']:.3g} | {med['grad_norm']:.3g} |"
        f" {med['clip_threshold']:.3g} | {med['clip_scale']:.3g} |"
        f" {med['loss_trend']:.2f} | {'/'.join(map(str, causes[:4]))} |")
  return "\n".join(lines)


def study(steps, seeds, quick=False, only=None, families=False):
  """The study's cells; `only`, if given, a cell ("task / optimizer") or a
  task name; `families`: the later families instead."""
  design = adaptive_tasks.design(steps)
  held = adaptive_tasks.held_out(steps)
  if families:
    design, held = {}, adaptive_tasks.families(steps)
  if quick:
    # A healthy design task and an exploding held-out one (a healthy
    # family with --families).
    design = {k: design[k] for k in ("regression-std",) if k in design}
    held = {k: held[k] for k in ("deep-tanh", "logistic") if k in held}
  scores, raw, fractions, traces = {}, {}, {}, {}
  for split, tasks in (("design", design), ("held-out", held)):
    for tname, task in tasks.items():
      for opt in OPTIMIZERS[:1] if quick else OPTIMIZERS:
        t0 = time.perf_counter()
        key = f"{tname} / {opt}"
        if only is not None and only not in (key, tname):
          continue
        cell, tr = run_cell(task, opt, seeds, STRATEGIES)
        raw[key] = cell
        if not task.exploding:
          scale = tr["clip_scale"][:, task.steps // 2:]
          fractions[key] = float(np.mean(scale >= 1.0))
        if (tname, opt) in TRACE_CELLS and not quick:
          traces[key] = trace_table(task, tr)
        scores[key] = {"split": split, "exploding": task.exploding,
                       **score(cell, task.exploding)}
        print(f"  {key}: {time.perf_counter() - t0:.1f} s", flush=True)
  return scores, raw, fractions, traces


def machine():
  import platform  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return (f"{dev.platform.upper()}, {os.cpu_count()} cores,"
          f" {platform.processor() or platform.machine()},"
          f" jax {jax.__version__}, optax {optax.__version__}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="2 tasks (1 with --families) with SGD, 60 steps,"
                      " 2 seeds: a smoke run")
  parser.add_argument("--json", default=None,
                      help=f"where to write the results (default {RESULTS};"
                      " --quick, --only, --seeds and --steps write nothing"
                      " unless given)")
  parser.add_argument("--first-seed", type=int, default=0,
                      help="seeds are first-seed, first-seed + 1, ...")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds per cell (default 10; 2 with --quick)")
  parser.add_argument("--families", action="store_true",
                      help="run the families added after the rule was"
                      " designed (adaptive_tasks.families) instead; writes"
                      " nothing unless --json")
  parser.add_argument("--only", default=None,
                      help='one cell ("adding-lstm / sgd") or one task')
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per run (default 400; 60 with"
                      " --quick)")
  args = parser.parse_args()
  global FIRST_SEED
  FIRST_SEED = args.first_seed
  steps, seeds = (60, 2) if args.quick else (400, 10)
  if args.seeds is not None:
    if args.seeds < 1:
      parser.error(f"--seeds must be at least 1, got {args.seeds}")
    seeds = args.seeds
  if args.steps is not None:
    if args.steps < 1:
      parser.error(f"--steps must be at least 1, got {args.steps}")
    steps = args.steps
  t0 = time.perf_counter()
  with jax.numpy_dtype_promotion("standard"):
    scores, raw, fractions, traces = study(steps, seeds, args.quick,
                                           args.only, args.families)
  if not scores:
    parser.error(f"--only: no cell or task named {args.only!r}")
  g = goals(scores, fractions)
  g_loss = goals(scores, {}, "adaptive(), loss=")
  print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()};"
        f" {steps} steps, {seeds} seeds, {time.perf_counter() - t0:.0f} s\n")
  print(table(scores))
  print("\nclip_scale == 1 (healthy, second half of training):")
  for k, f in fractions.items():
    print(f"  {k}: {100 * f:.0f}%")
  for label, goal_sets in (("adaptive()", g),
                           ("adaptive() with loss= passed", g_loss)):
    for split, gs in goal_sets.items():
      print(f"\nGoals of {label} on {split} tasks:")
      for k, (ok, why) in gs.items():
        print(f"  {k}: {'met' if ok else 'MISSED'} ({why})")
  for key, text in traces.items():
    print(f"\nTrace of adaptive() on {key}:\n{text}")
  partial = (args.quick or args.families or args.only is not None
             or args.seeds is not None
             or args.steps is not None)
  path = args.json or (None if partial else RESULTS)
  if path:
    with open(path, "w") as f:
      json.dump({"machine": machine(), "steps": steps, "seeds": seeds,
                 "first_seed": FIRST_SEED,
                 "scores": scores, "healthy_unclipped_fraction": fractions,
                 "traces": traces,
                 "goals": {s: {k: [bool(ok), why] for k, (ok, why) in gs.items()}
                           for s, gs in g.items()},
                 "goals_loss": {s: {k: [bool(ok), why]
                                    for k, (ok, why) in gs.items()}
                                for s, gs in g_loss.items()},
                 "losses": raw}, f, indent=1)


if __name__ == "__main__":
  main()
