"""Makes mistakes loud, and gives JAX 8 CPU devices for the sharding tests."""

import os

# Must happen before JAX starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from optax_clipkit import _numerics  # pylint: disable=g-import-not-at-top


@pytest.fixture(params=["several_devices", "single_device"])
def reductions(request, monkeypatch):
  """Runs a test as with several devices and as on a single device.

  With 8 devices every leaf is reduced and scaled in its own shape (a leaf
  could be sharded); on a single device leaves are flattened and small ones
  are reduced in one pack. Both forms must give the same results.
  """
  single = request.param == "single_device"
  monkeypatch.setattr(_numerics, "_single_device", lambda: single)
  return request.param
