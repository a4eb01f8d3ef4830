"""The benchmark scripts run (smoke runs: their figures are not checked)."""

import importlib
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


def run(script, tmp_path, *args):
  out = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, str(BENCHMARKS / script), "--quick", "--json", str(out),
       *args],
      capture_output=True, text=True, timeout=600, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_run_quick(tmp_path):
  stdout, results = run("run.py", tmp_path)
  assert "## Step time" in stdout and "## Compile time" in stdout
  assert {"step", "compile", "memory", "stateful"} <= set(results)
  for row in results["step"]:
    assert row["vs_optax"] > 0


@pytest.mark.slow
def test_exploding_quick(tmp_path):
  stdout, results = run("exploding.py", tmp_path)
  assert "median / worst" in stdout
  assert len(results) == 8  # 4 tasks, each with SGD and with Adam.


def _import_benchmark(monkeypatch, name):
  """A module of benchmarks/, importable for this test only."""
  if str(BENCHMARKS) not in sys.path:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
  return importlib.import_module(name)


def test_exploding_one_task(monkeypatch):
  # A fast stand-in for the slow smoke run above: one task, one threshold,
  # one strategy, two seeds, 20 steps, in process.
  exploding = _import_benchmark(monkeypatch, "exploding")
  monkeypatch.setattr(exploding, "GRID", (1.0,))
  monkeypatch.setattr(exploding, "STRATEGIES",
                      {"adaptive()": exploding.STRATEGIES["adaptive()"]})
  with jax.numpy_dtype_promotion("standard"):
    rows = exploding.study(seeds=2, steps=20, only="control")
  assert set(rows) == {"control / sgd", "control / adam"}
  for row in rows.values():
    assert row["best fixed"] == 1.0 and np.isfinite(row["adaptive()"])
  assert "median / worst" not in exploding.table(rows)  # No exploding task.


def smoke(script, *args):
  """The output of ``script --quick [args]``, which must succeed."""
  proc = subprocess.run(
      [sys.executable, str(BENCHMARKS / script), "--quick", *args],
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_grouped_norm_quick():
  assert "global_norm, per leaf" in smoke("grouped_norm.py")


def test_estimate_bias_quick():
  stdout = smoke("estimate_bias.py")
  assert "| 100-200 |" in stdout and "less the projection" in stdout
  assert "less the true noise" in stdout
  assert "the true gradient's change" in stdout
  assert "with adaptive()" in stdout
  assert "with no clipping" in smoke("estimate_bias.py", "--no-clipping")


def test_exploding_rejects_no_seeds():
  proc = subprocess.run(
      [sys.executable, str(BENCHMARKS / "exploding.py"), "--seeds", "0"],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0 and "--seeds must be at least 1, got 0" in (
      proc.stderr)


def test_study_rejects_no_seeds_no_steps_and_unknown_cells():
  script = str(BENCHMARKS / "adaptive_study.py")
  proc = subprocess.run([sys.executable, script, "--seeds", "0"],
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode != 0 and "--seeds must be at least 1, got 0" in (
      proc.stderr)
  proc = subprocess.run([sys.executable, script, "--steps", "0"],
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode != 0 and "--steps must be at least 1, got 0" in (
      proc.stderr)
  proc = subprocess.run([sys.executable, script, "--only", "no-such-task"],
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode != 0 and "no cell or task named" in proc.stderr


def test_other_optimizers_quick():
  # One optimizer, accumulated: the script end to end, its --multisteps
  # too (every optimizer of the table steps: the test below).
  stdout = smoke("other_optimizers.py", "--only", "logistic",
                 "--optimizers", "lion", "--multisteps", "2")
  assert "logistic / lion: against no clipping: adaptive()" in stdout


def test_other_optimizers_all_step(monkeypatch):
  # Every optimizer of the table builds and takes a finite step.
  adaptive_study = _import_benchmark(monkeypatch, "adaptive_study")
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  grads = {"w": jnp.full((4, 3), 0.5), "b": jnp.ones((3,))}
  rates = {"sgd": 0.01, "adam": 1e-3}
  for name, make in adaptive_study.OTHER_OPTIMIZERS.items():
    opt = make(rates)
    # Some of optax's optimizers mix int and float dtypes.
    with jax.numpy_dtype_promotion("standard"):
      updates, _ = opt.update(grads, opt.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u)) & jnp.any(u != 0))
               for u in jax.tree.leaves(updates)), name


def test_long_healthy_quick():
  assert "| regression-std / sgd |" in smoke("long_healthy.py")


def test_docs_page_matches_the_results():
  proc = subprocess.run(
      [sys.executable, str(BENCHMARKS / "make_docs.py"), "--check"],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, (
      "docs/benchmarks.md is stale: run python benchmarks/make_docs.py\n"
      + proc.stderr[-2000:])
