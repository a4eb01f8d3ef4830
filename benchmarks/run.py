"""The benchmark suite: step time, compile time and memory against optax.

Run: ``python benchmarks/run.py`` (``--quick`` for a smoke run, ``--json F``
to keep the numbers). Prints markdown tables.

- Step time of ``chain(clipper, optimizer)`` on a transformer-like and a
  ResNet-like tree of about 16M parameters, float32 and bfloat16 gradients,
  against ``chain(optax equivalent, optimizer)`` and the optimizer alone
  (``sgd`` with momentum, ``adamw``): medians of per-round ratios from
  interleaved rounds in one process.
- Compile time of one step against the number of leaves, against optax.
- The overhead of the stateful strategies and `per_module` on top of
  `global_norm`.
- Achieved read bandwidth of the global-norm pass (GB/s) against a plain
  sum over the same bytes and, on GPUs and TPUs, the device's peak.
- The overhead of the training guard, `skip_spikes`, and of `monitor` over
  the bare AdamW step.
- Compiled temporary memory against optax.
- The exploding-gradient study of ``benchmarks/exploding.py`` (full run only).
- ``torch.nn.utils.clip_grad_norm_`` (foreach) on the same tree, if torch is
  installed.

``python benchmarks/make_docs.py`` turns the JSON into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
import _harness  # pylint: disable=g-import-not-at-top,wrong-import-position

import optax_clipkit as clipkit  # pylint: disable=g-import-not-at-top


def transformer_tree(d_model, n_layers, vocab, dtype, seed):
  """Leaves shaped like a pre-norm transformer's parameters."""
  shapes = {"embed": (vocab, d_model), "final_norm/scale": (d_model,)}
  for i in range(n_layers):
    p = f"layer_{i}/"
    shapes.update({
        p + "attn_norm/scale": (d_model,), p + "attn/qkv": (d_model, 3 * d_model),
        p + "attn/out": (d_model, d_model), p + "mlp_norm/scale": (d_model,),
        p + "mlp/up": (d_model, 4 * d_model), p + "mlp/up_bias": (4 * d_model,),
        p + "mlp/down": (4 * d_model, d_model), p + "mlp/down_bias": (d_model,),
    })
  return _random_tree(shapes, dtype, seed)


def resnet_tree(width, dtype, seed):
  """Leaves shaped like a ResNet-18's (convolutions and batch norms)."""
  shapes = {"stem/conv": (7, 7, 3, width), "stem/bn_scale": (width,),
            "stem/bn_bias": (width,)}
  c_in = width
  for s, mult in enumerate((1, 2, 4, 8)):
    c = width * mult
    for b in range(2):
      p = f"stage_{s}/block_{b}/"
      for j, (ci, co) in enumerate(((c_in, c), (c, c))):
        shapes[p + f"conv_{j}"] = (3, 3, ci, co)
        shapes[p + f"bn_{j}_scale"] = (co,)
        shapes[p + f"bn_{j}_bias"] = (co,)
      if c_in != c:
        shapes[p + "shortcut"] = (1, 1, c_in, c)
      c_in = c
  shapes["head/kernel"] = (c_in, 1000)
  shapes["head/bias"] = (1000,)
  return _random_tree(shapes, dtype, seed)


def _random_tree(shapes, dtype, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {name: jax.random.normal(k, shape, jnp.float32).astype(dtype)
          for k, (name, shape) in zip(keys, shapes.items())}


def trees(quick):
  if quick:  # A smoke run: the resnet tree runs the same code.
    return {"transformer": lambda dt, s: transformer_tree(128, 2, 1000, dt, s)}
  return {"transformer": lambda dt, s: transformer_tree(512, 4, 8192, dt, s),
          "resnet": lambda dt, s: resnet_tree(77, dt, s)}


CLIPPERS = {
    # name -> (clipkit, optax equivalent). optax has no per-leaf norm
    # clipper; clip_by_block_rms does the same work (an RMS per leaf).
    "global_norm": (lambda: clipkit.global_norm(1.0),
                    lambda: optax.clip_by_global_norm(1.0)),
    "per_leaf_norm": (lambda: clipkit.per_leaf_norm(1.0),
                      lambda: optax.clip_by_block_rms(1.0)),
    "value": (lambda: clipkit.value(1.0), lambda: optax.clip(1.0)),
    # With the opt-in clipped-fraction count: more work than optax.clip.
    "value_counted": (lambda: clipkit.value(1.0, count_clipped=True),
                        lambda: optax.clip(1.0)),
}
OPTIMIZERS = {"sgd": lambda: optax.sgd(1e-3, momentum=0.9),
              "adamw": lambda: optax.adamw(1e-3)}


def step_times(quick):
  rows = []
  rounds = 1 if quick else 10
  dtypes = (jnp.float32,) if quick else (jnp.float32, jnp.bfloat16)
  optimizers = ["adamw"] if quick else list(OPTIMIZERS)
  for tname, make in trees(quick).items():
    for dtype in dtypes:
      grads, params = make(dtype, 1), make(dtype, 2)
      grads = jax.tree.map(lambda g: g * 10, grads)  # Clipping is active.
      for oname in optimizers:
        opt = OPTIMIZERS[oname]
        for cname, (ours, theirs) in CLIPPERS.items():
          cands = {"clipkit": optax.chain(ours(), opt()),
                   "optax": optax.chain(theirs(), opt()), "alone": opt()}
          t = _harness.interleaved_times(cands, grads, params, rounds=rounds)
          rows.append({
              "tree": tname, "dtype": jnp.dtype(dtype).name,
              "params_M": _harness.n_params(grads) / 1e6,
              "step": f"{cname} + {oname}",
              "clipkit_ms": 1e3 * float(np.median(t["clipkit"])),
              "vs_optax": _harness.median_ratio(t, "clipkit", "optax"),
              "vs_optimizer": _harness.median_ratio(t, "clipkit", "alone"),
              "optax_vs_optimizer": _harness.median_ratio(t, "optax", "alone"),
          })
          print(f"  {rows[-1]['tree']} {rows[-1]['dtype']} {rows[-1]['step']}",
                file=sys.stderr, flush=True)
  return rows


def stateful_overhead(quick):
  make = trees(quick)["transformer"]
  grads, params = make(jnp.float32, 1), make(jnp.float32, 2)
  layer_rules = [(f"layer_{i}/", clipkit.global_norm(1.0))
                 for i in range(8) if any(k.startswith(f"layer_{i}/") for k in grads)]
  cands = {
      "global_norm": clipkit.global_norm(1.0),
      "adaptive": clipkit.adaptive(),
      "autoclip": clipkit.autoclip(),
      "zclip": clipkit.zclip(),
      "per_module (a global_norm per layer)": clipkit.per_module(
          layer_rules, default=clipkit.global_norm(1.0)),
  }
  rows = []
  for opt_name in ("adamw",) if quick else ("none", "adamw"):
    c = {k: (tx if opt_name == "none" else optax.chain(tx, optax.adamw(1e-3)))
         for k, tx in cands.items()}
    t = _harness.interleaved_times(c, grads, params, rounds=1 if quick else 10)
    for k in cands:
      rows.append({"strategy": k, "optimizer": opt_name,
                   "vs_global_norm": _harness.median_ratio(t, k, "global_norm")})
  return rows


def guard_overhead(quick):
  """`skip_spikes` and `monitor` over the bare AdamW step they wrap."""
  make = trees(quick)["transformer"]
  grads, params = make(jnp.float32, 1), make(jnp.float32, 2)
  adamw = lambda: optax.adamw(1e-3)
  clipped = lambda: optax.chain(clipkit.global_norm(1.0), adamw())
  cands = {
      "adamw": adamw(),
      "skip_spikes(adamw)": clipkit.skip_spikes(adamw()),
      "chain(monitor, adamw)": optax.chain(clipkit.monitor(), adamw()),
      "global_norm + adamw": clipped(),
      "skip_spikes(global_norm + adamw)": clipkit.skip_spikes(clipped()),
  }
  t = _harness.interleaved_times(cands, grads, params,
                                 rounds=1 if quick else 20)
  base = {"skip_spikes(adamw)": "adamw", "chain(monitor, adamw)": "adamw",
          "skip_spikes(global_norm + adamw)": "global_norm + adamw"}
  return [{"step": k, "params_M": _harness.n_params(grads) / 1e6,
           "ms": 1e3 * float(np.median(t[k])), "over": b,
           "ratio": _harness.median_ratio(t, k, b)} for k, b in base.items()]


def compile_times(quick):
  rows = []
  for n in ((10,) if quick else (10, 100, 1000, 2000)):
    tree = _harness.make_tree(n, 100 * n, seed=3)
    for cname, (ours, theirs) in list(CLIPPERS.items())[:1 if n > 1000 else 4]:
      secs = _harness.interleaved_compile_seconds(
          {"ours": ours(), "theirs": theirs()}, tree, 1 if quick else 3)
      a, b = secs["ours"], secs["theirs"]
      rows.append({"leaves": n, "strategy": cname, "clipkit_s": a,
                   "optax_s": b, "ratio": a / b})
      print(f"  compile {n} {cname}", file=sys.stderr, flush=True)
  return rows


# Peak memory bandwidth in GB/s, from the vendors' data sheets, by the start
# of `device_kind`; None where unknown (CPUs: the table then shows the
# measured read bandwidth of one plain sum over the same bytes instead).
PEAK_GBPS = {"NVIDIA H200": 4800, "NVIDIA H100 PCIe": 2000,
             "NVIDIA H100": 3350, "NVIDIA A100-SXM4-80GB": 2039,
             "NVIDIA A100": 1555, "NVIDIA L4": 300, "TPU v4": 1200,
             "TPU v5 lite": 819, "TPU v5p": 2765, "TPU v6 lite": 1640}


def peak_gbps(kind: str):
  return next((v for k, v in PEAK_GBPS.items() if kind.startswith(k)), None)


def norm_bandwidth(quick):
  """Achieved read bandwidth of the global-norm pass, in GB/s.

  Bytes read (every leaf once) over the best of several timed runs, for
  clipkit's norm, optax's `global_norm`, and one plain sum over a single
  buffer of the same bytes (what the memory system gives a reduction).
  """
  from optax_clipkit import _numerics  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  rows = []
  sized = dict(trees(quick))
  if dev.platform != "cpu" and not quick:
    # 270M parameters: a pass long enough to time against the peak.
    sized["transformer-270M"] = (
        lambda dt, s: transformer_tree(2048, 4, 32768, dt, s))
  for tname, make in sized.items():
    for dtype in (jnp.float32, jnp.bfloat16):
      tree = make(dtype, 1)
      leaves = jax.tree.leaves(tree)
      nbytes = sum(x.nbytes for x in leaves)
      flat = jnp.zeros((nbytes // jnp.dtype(dtype).itemsize,), dtype)
      ours = jax.jit(lambda t: _numerics.global_norm(jax.tree.leaves(t)).value)
      theirs = jax.jit(optax.global_norm)
      plain = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
      gbps = {name: nbytes / _harness.best_seconds(f, arg) / 1e9 for name, f, arg in
              (("clipkit", ours, tree), ("optax", theirs, tree),
               ("plain_sum", plain, flat))}
      peak = peak_gbps(kind)
      rows.append({"device": kind, "tree": tname,
                   "dtype": jnp.dtype(dtype).name, "MB": nbytes / 1e6,
                   "clipkit_GBps": gbps["clipkit"],
                   "optax_GBps": gbps["optax"],
                   "plain_sum_GBps": gbps["plain_sum"], "peak_GBps": peak,
                   "clipkit_vs_peak": gbps["clipkit"] / peak if peak else None})
  return rows


def temp_bytes(tx, tree):
  compiled = _harness.step_fn(tx).lower(tree, tx.init(tree), tree).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def memory(quick):
  make = trees(quick)["transformer"]
  tree = make(jnp.float32, 1)
  rows = []
  for cname, (ours, theirs) in CLIPPERS.items():
    for oname, opt in (("alone", None), ("adamw", OPTIMIZERS["adamw"])):
      c = (lambda t: t) if opt is None else (lambda t: optax.chain(t, opt()))
      a, b = temp_bytes(c(ours()), tree), temp_bytes(c(theirs()), tree)
      rows.append({"strategy": cname, "with": oname, "clipkit_MB": a / 2**20,
                   "optax_MB": b / 2**20})
  return rows


def torch_reference(quick):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  make = trees(quick)["transformer"]
  grads = make(jnp.float32, 1)
  tensors = [torch.from_numpy(np.array(g)) for g in jax.tree.leaves(grads)]
  params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
  for p, t in zip(params, tensors):
    p.grad = t.clone()
  step = _harness.step_fn(clipkit.global_norm(1.0))
  state = clipkit.global_norm(1.0).init(grads)
  jax.block_until_ready(step(grads, state, grads))
  ours, theirs = [], []
  for _ in range(3 if quick else 10):
    t0 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    theirs.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(step(grads, state, grads))
    ours.append(time.perf_counter() - t0)
  return {"torch_clip_grad_norm_ms": 1e3 * float(np.median(theirs)),
          "clipkit_global_norm_step_ms": 1e3 * float(np.median(ours)),
          "note": "clipkit's figure includes applying the update"}


SECTIONS = {
    # key -> (function, title, column headers)
    "step": (step_times,
             "Step time (ratios are medians of interleaved rounds)",
             ["tree", "dtype", "M params", "step", "clipkit ms",
              "clipkit/optax", "clipkit/optimizer", "optax/optimizer"]),
    "stateful": (stateful_overhead,
                 "Overhead on top of global_norm (transformer tree, float32)",
                 ["strategy", "optimizer", "time / global_norm"]),
    "bandwidth": (norm_bandwidth,
                  "Global-norm pass: achieved read bandwidth",
                  ["device", "tree", "dtype", "MB read", "clipkit GB/s",
                   "optax GB/s", "plain sum GB/s", "peak GB/s",
                   "clipkit/peak"]),
    "guard": (guard_overhead,
              "Training guard and monitor over the step they wrap"
              " (transformer tree, float32)",
              ["step", "M params", "ms", "over", "ratio"]),
    "compile": (compile_times, "Compile time of one step",
                ["leaves", "strategy", "clipkit s", "optax s", "ratio"]),
    "memory": (memory,
               "Compiled temporary memory (transformer tree, float32)",
               ["strategy", "with", "clipkit MiB", "optax MiB"]),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small trees, one round, a subset: a smoke run")
  parser.add_argument("--json", help="write the results to this file")
  every = [*SECTIONS, "torch", "exploding"]
  parser.add_argument(
      "--only", default=None,
      help=f"comma-separated sections to run, of: {', '.join(every)}"
      " (default: all)")
  args = parser.parse_args()
  q = args.quick
  only = set(args.only.split(",")) if args.only else set(every)
  unknown = only - set(every)
  if unknown:
    parser.error(f"--only: unknown sections {sorted(unknown)}")
  results = {"machine": _harness.machine(),
             "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
             "quick": q}
  print(f"machine: {results['machine']}\n")

  def save():
    # After every section, so that a long run stopped late keeps the rest.
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)

  for key, (run, title, header) in SECTIONS.items():
    if key in only:
      results[key] = rows = run(q)
      print(f"\n## {title}\n")
      print(_harness.table(header, [list(r.values()) for r in rows]))
      save()

  if "torch" in only:
    results["torch"] = ref = torch_reference(q)
    if ref:
      print("\n## torch reference\n")
      print(_harness.table(list(ref), [list(ref.values())]))
    save()

  if "exploding" in only and not q:
    import exploding  # pylint: disable=g-import-not-at-top
    with jax.numpy_dtype_promotion("standard"):
      results["exploding"] = rows = exploding.study(seeds=exploding.SEEDS, steps=2000)
    print("\n## Exploding-gradient tasks (final loss / best fixed threshold)\n")
    print(exploding.table(rows))
    save()


if __name__ == "__main__":
  main()
