"""Makes mistakes loud, and gives JAX 8 CPU devices for the sharding tests."""

import os

import jax

# In-process, before JAX starts its backends: subprocesses (notebook kernels,
# benchmark smoke runs) keep the single device a user's machine has.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from optax_clipkit import _tactics  # pylint: disable=g-import-not-at-top


def _run_gpu_branch(monkeypatch):
  monkeypatch.setattr(_tactics, "dispatch",
                      lambda cpu, default, *args, cuda=None:
                      (cuda or default)(*args))
  monkeypatch.setattr(_tactics, "single_device", lambda: True)


def pytest_xdist_auto_num_workers(config):
  """``-n auto``: one worker a core, at most 4 (each holds its own JAX)."""
  del config
  return min(os.cpu_count() or 1, 4)


@pytest.fixture(params=["one_gpu", "cpu_several_devices", "cpu_single_device"])
def code_path(request, monkeypatch):
  """Runs a test on each code path that reduces and scales leaves.

  ``one_gpu`` is what a single CUDA GPU runs, run here on CPU: the global
  norm reduces small leaves together (`_tactics.grouped_sums`); everything
  else is the portable code that TPU and several GPUs run (both sums of
  squares in one read, every leaf in its own shape). The CPU paths run the
  overflow sum only when needed; with 8 devices each leaf keeps its shape (a
  leaf could be sharded), on a single device leaves are flattened. All must
  give the same results.
  """
  if request.param == "one_gpu":
    _run_gpu_branch(monkeypatch)
  else:
    monkeypatch.setattr(_tactics, "single_device",
                        lambda: request.param == "cpu_single_device")
  return request.param


@pytest.fixture
def portable(monkeypatch):
  """The portable code everywhere: what TPU and several GPUs run."""
  monkeypatch.setattr(_tactics, "dispatch",
                      lambda cpu, default, *args, cuda=None: default(*args))
  monkeypatch.setattr(_tactics, "single_device", lambda: False)


@pytest.fixture
def small_groups(monkeypatch):
  """A single GPU's grouped global norm, with small limits.

  A few small leaves then make several groups (by their count and by their
  size), and larger ones keep their own reduction.
  """
  _run_gpu_branch(monkeypatch)
  monkeypatch.setattr(_tactics, "_GROUPED_LIMIT", 40)
  monkeypatch.setattr(_tactics, "_GROUP", 3)
  monkeypatch.setattr(_tactics, "_GROUP_SIZE", 60)
