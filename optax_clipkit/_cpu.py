"""XLA:CPU tactics, each gated to the CPU platform and measured.

Each function here runs only where `lax.platform_dependent` selects its CPU
branch; GPU and TPU run the portable code in `_numerics` and `_value`, in
each leaf's own shape. A tactic stays only while it pays on XLA:CPU.
Figures: a 2-core x86_64 CPU, jax 0.10.2, optax 0.2.8, trees of 16.8M
parameters (``benchmarks/run.py``), step time against optax's clipper in the
same chain, interleaved in one process.

1. **The overflow sum runs only when needed** (`leaf_sums`). XLA:CPU runs a
   second sum of squares in the same loop at a cost: a global-norm + SGD
   step took 1.3x optax's time with both sums always computed, 1.0x with
   the second in a conditional (2026-11-25). The conditional costs nothing
   on CPU, where it is not a device-to-host sync.
2. **Leaves are flattened** (`vector`). XLA:CPU runs a reduction or an
   elementwise kernel with a runtime scalar operand markedly slower over
   rank-4 arrays: on a ResNet-like tree a global-norm + SGD step took 1.2x
   optax's time with conv kernels in their own shape, 1.01x flattened
   (2026-11-23). Only on a single device: inside `jax.jit` a leaf's sharding
   is not visible, and flattening a leaf sharded along an inner axis would
   gather it.
3. **`value`'s count runs apart** (`apart`). Fused into the loop that clips
   (and, in a training step, applies) the updates, the count made XLA:CPU's
   multi-output loop several times slower: a step of `value` alone took
   4.4x `optax.clip`'s time fused, 1.6x apart (2026-11-21).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from optax_clipkit import _numerics


def dispatch(cpu: Callable, default: Callable, *args):
  """``cpu(*args)`` where XLA:CPU runs the computation, else ``default``.

  The one switch between the CPU tactics and the portable code. Chosen when
  the computation is lowered for its platform, so a GPU or TPU never sees the
  CPU branch.
  """
  return lax.platform_dependent(*args, cpu=cpu, default=default)


def single_device() -> bool:
  """Whether leaves may be reshaped without moving data (one device)."""
  return jax.device_count() == 1


def vector(x: jax.Array) -> jax.Array:
  """`x` flattened to a vector where that is free (on a single device)."""
  return x.ravel() if single_device() else x


def leaf_sums(leaves: Sequence[jax.Array], dtype,
              psum: Callable[[jax.Array], jax.Array]):
  """`_numerics.leaf_sums` with the overflow sum in a conditional."""
  leaves = [vector(x) for x in leaves]
  local = _numerics.stack_scalars(
      [_numerics.sumsq(x, dtype) for x in leaves])
  q = psum(local)
  qd = lax.cond(
      jnp.sum(q) < jnp.inf,
      lambda: q,  # Not used where the sums are in range.
      lambda: psum(_numerics.down_sums(leaves, local, dtype)),
  )
  return q, qd


def apart(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """``f(x)`` in a computation of its own, which XLA:CPU does not fuse.

  `x` is a scalar; a conditional on a value XLA cannot fold keeps ``f`` out
  of the loops around it. Where `x` is NaN the result is NaN.
  """
  out = jax.eval_shape(f, x)
  nan = lambda x: jnp.full(out.shape, jnp.nan, out.dtype)
  x = lax.optimization_barrier(x)
  return lax.cond(x == x, f, nan, x)
