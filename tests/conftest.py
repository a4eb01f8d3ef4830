"""Makes mistakes loud, and gives JAX 8 CPU devices for the sharding tests."""

import jax

# In-process, before JAX starts its backends: subprocesses (notebook kernels,
# benchmark smoke runs) keep the single device a user's machine has.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from optax_clipkit import _tactics  # pylint: disable=g-import-not-at-top


@pytest.fixture(params=["portable", "cpu_several_devices", "cpu_single_device"])
def code_path(request, monkeypatch):
  """Runs a test on each code path that reduces and scales leaves.

  ``portable`` is what GPU and TPU run (both sums of squares in one read,
  every leaf in its own shape), run here on CPU. The CPU paths run the
  overflow sum only when needed; with 8 devices each leaf keeps its shape (a
  leaf could be sharded), on a single device leaves are flattened. All must
  give the same results.
  """
  if request.param == "portable":
    monkeypatch.setattr(_tactics, "dispatch",
                        lambda cpu, default, *args, cuda=None: default(*args))
  single = request.param == "cpu_single_device"
  monkeypatch.setattr(_tactics, "single_device", lambda: single)
  return request.param


@pytest.fixture
def one_gpu(monkeypatch):
  """What XLA:GPU runs on a single device, run here on CPU.

  Small limits, so that a few small leaves make several groups (by their
  count and by their size) and larger ones keep their own reduction.
  """
  monkeypatch.setattr(_tactics, "dispatch",
                      lambda cpu, default, *args, cuda=None:
                      (cuda or default)(*args))
  monkeypatch.setattr(_tactics, "single_device", lambda: True)
  monkeypatch.setattr(_tactics, "_GROUPED_LIMIT", 40)
  monkeypatch.setattr(_tactics, "_GROUP", 3)
  monkeypatch.setattr(_tactics, "_GROUP_SIZE", 60)
