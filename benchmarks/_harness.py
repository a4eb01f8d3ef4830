"""Timing helpers shared by the benchmark scripts.

Every comparison is interleaved in one process: each round runs every
candidate once, in a rotating order, and ratios are taken round by round, so
machine noise hits all candidates alike. Compile time is measured apart from
run time, on a fresh `jax.jit` each time.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax


def machine() -> str:
  """A one-line description of where the numbers were taken."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (
      f"{dev.platform.upper()} ({kind}), {os.cpu_count()} cores,"
      f" {platform.machine()}, jax {jax.__version__}, optax {optax.__version__}"
  )


def make_tree(n_leaves: int, n_params: int, dtype=jnp.float32, seed: int = 0,
              scale: float = 1.0, shape_seed: int = 0):
  """A dict of `n_leaves` arrays totalling about `n_params` elements.

  Leaf sizes vary like a network's (a few large matrices, many small
  vectors): sizes are drawn log-uniformly, then rescaled to the total.
  """
  rng = np.random.default_rng(shape_seed)
  raw = np.exp(rng.uniform(np.log(16), np.log(1e6), size=n_leaves))
  sizes = np.maximum(1, (raw / raw.sum() * n_params).astype(int))
  tree = {}
  for i, size in enumerate(sizes):
    cols = 128 if size >= 1024 else 1
    rows = max(1, int(size) // cols)
    key = jax.random.PRNGKey(seed * 100_003 + i)
    tree[f"layer_{i:04d}"] = (
        scale * jax.random.normal(key, (rows, cols), jnp.float32)
    ).astype(dtype)
  return tree


def n_params(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def step_fn(tx: optax.GradientTransformation):
  """A jitted optimizer step: (grads, state, params) -> (params, state)."""

  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


def compile_seconds(tx: optax.GradientTransformation, tree, repeats: int = 1
                    ) -> float:
  """Median wall time to lower and compile one step of `tx` on `tree`."""
  state = tx.init(tree)
  times = []
  for _ in range(repeats):
    step = step_fn(tx)  # A fresh jit: no cache hit.
    t0 = time.perf_counter()
    step.lower(tree, state, tree).compile()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def interleaved_compile_seconds(
    candidates: Mapping[str, optax.GradientTransformation],
    tree,
    repeats: int = 3,
) -> dict[str, float]:
  """Median compile time of each candidate, the compiles interleaved.

  One compile alone moves by about 30% between runs; interleaving puts the
  same machine state behind every candidate's median.
  """
  times: dict[str, list[float]] = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, tx in candidates.items():
      times[name].append(compile_seconds(tx, tree))
  return {name: statistics.median(t) for name, t in times.items()}


def interleaved_times(
    candidates: Mapping[str, optax.GradientTransformation],
    grads,
    params,
    rounds: int = 30,
    inner: int = 3,
) -> dict[str, list[float]]:
  """Per-round seconds per step for each candidate, interleaved."""
  compiled = {}
  for name, tx in candidates.items():
    state = tx.init(params)
    step = step_fn(tx)
    out = step(grads, state, params)  # Compile and warm up.
    jax.block_until_ready(out)
    compiled[name] = (step, state)
  step, state = next(iter(compiled.values()))
  inner = max(inner, calls_per_round(lambda: step(grads, state, params)))
  names = list(compiled)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[: r % len(names)]
    for name in order:
      step, state = compiled[name]
      t0 = time.perf_counter()
      for _ in range(inner):
        out = step(grads, state, params)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / inner)
  return times


def calls_per_round(call, seconds: float = 0.01) -> int:
  """How many back-to-back `call()`s make a round of `seconds` (1 to 1000).

  On a GPU a 16M-parameter step takes some 0.1 ms, near the host's dispatch
  time: queuing enough calls before waiting makes a round time the device,
  not the host. On a CPU a step is long and this is 1.
  """
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  return int(min(1000, np.ceil(seconds / max(time.perf_counter() - t0, 1e-6))))


def median_ratio(times: Mapping[str, list[float]], a: str, b: str) -> float:
  """Median over rounds of time(a) / time(b)."""
  return statistics.median(x / y for x, y in zip(times[a], times[b]))


def table(header: list[str], rows: list[list[object]]) -> str:
  """A markdown table."""
  def fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)

  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def best_seconds(f, *args, rounds=20):
  """The best per-call time over `rounds` rounds of back-to-back calls."""
  jax.block_until_ready(f(*args))
  inner = calls_per_round(lambda: f(*args))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return min(times)
