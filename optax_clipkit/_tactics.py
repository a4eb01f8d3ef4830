"""Per-platform tactics for XLA:CPU and XLA:GPU, each gated and measured.

Each function here runs only where `dispatch` selects its platform's branch.
Everything else runs the portable code in `_numerics` and `_value`, each leaf
in its own shape: TPU, ROCm GPUs, CUDA GPUs among several devices, and a
single CUDA GPU apart from its global norm. A tactic stays only while it
pays on its platform.

**XLA:CPU.** Figures: a 2-core x86_64 CPU, jax 0.10.2, optax 0.2.8, trees of
16.8M parameters (``benchmarks/run.py``), step time against optax's clipper
in the same chain, interleaved in one process.

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
3. **Small leaves are packed** (`pack_small`, `per_leaf_sums`). XLA:CPU
   compiles a reduction of a small array to a loop that takes about ten
   times longer to compile than the library call it uses for larger ones, so
   leaves under 4,096 elements are copied into one vector (at most 2**20
   elements) and reduced at once. At 1,000 leaves this took the compile time
   of a global-norm step from 0.7x optax's to 0.35x (2026-11-21).
4. **`value`'s count runs apart** (`apart`). Fused into the loop that clips
   (and, in a training step, applies) the updates, the count made XLA:CPU's
   multi-output loop several times slower: a step of `value` alone took
   4.4x `optax.clip`'s time fused, 1.6x apart (2026-11-21).

**XLA:GPU (CUDA).** Figures: one NVIDIA H200, jax 0.11.2, optax 0.2.8,
float32 trees, both ways side by side in one process (the comparison of
``benchmarks/grouped_norm.py``).

5. **Small leaves are reduced together for the global norm**
   (`grouped_sums`), on a single device. XLA:GPU reduces each
   leaf in a kernel of its own (two for a large one), and a 16M-parameter
   step is bound by kernel launches, not by memory. A global-norm + AdamW
   step took 1.23x AdamW's time (a transformer's 34 leaves) and 1.25x (64
   leaves) with a reduction per leaf; 1.07x and 1.06x grouped, where optax's
   clipper took 1.14x and 1.16x. The norm pass read 1.0 TB/s against 0.67
   (34 leaves) and 0.66 against 0.28 (64 leaves) (2026-11-26). XLA fuses the
   concatenation into the reduction rather than copying, but such a
   reduction reads a large leaf at about half the bandwidth of its own
   kernel: with every leaf of a 270M-parameter tree in it, 1.5-2.6 TB/s
   against 3.1 (an earlier run the same day). Leaves of `_GROUPED_LIMIT`
   elements or more therefore keep their own reduction; that tree then read
   3.5 TB/s, against 3.2 per leaf. These figures are float32: the norm pass
   of a bfloat16 tree of 16M parameters (34 MB) read 0.19-0.53 TB/s grouped,
   0.17-0.42 per leaf and 0.17-0.44 for optax's, too short a pass to time
   the memory; at 270M, 2.7 TB/s grouped against 2.45 per leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from optax_clipkit import _numerics


def dispatch(cpu: Callable, default: Callable, *args,
             cuda: Callable | None = None):
  """``cpu(*args)`` on XLA:CPU, ``cuda(*args)`` on CUDA GPUs, else ``default``.

  The one switch between the platforms' tactics and the portable code
  (`default`, also on CUDA GPUs where `cuda` is None). Chosen when the
  computation is lowered for its platform, so no platform runs another's
  branch (every branch is traced).
  """
  branches = {"cpu": cpu} if cuda is None else {"cpu": cpu, "cuda": cuda}
  return lax.platform_dependent(*args, default=default, **branches)


def single_device() -> bool:
  """Whether leaves may be reshaped without moving data (one device)."""
  return jax.device_count() == 1


def vector(x: jax.Array) -> jax.Array:
  """`x` flattened to a vector where that is free (on a single device)."""
  return x.ravel() if single_device() else x


_SMALL = 4096  # Leaves with fewer elements are packed ...
_PACK_LIMIT = 1 << 20  # ... up to this many elements in all.


class Packed(NamedTuple):
  """Small leaves' elements in one vector.

  ``index`` lists the packed leaves; ``data`` holds their elements (real and
  imaginary parts apart) in leaf order; ``segment`` maps each element to its
  position in ``index``.
  """

  index: tuple[int, ...]
  data: jax.Array
  segment: np.ndarray


def _flat_real(x: jax.Array, dtype) -> jax.Array:
  """`x`'s elements as a vector of `dtype`, complex ones as real then
  imaginary parts."""
  y = x.ravel()
  if jnp.iscomplexobj(y):
    y = jnp.concatenate([y.real, y.imag])
  return y.astype(dtype)


def pack_small(leaves: Sequence[jax.Array], dtype) -> Packed | None:
  """Packs the small leaves of `leaves` as `dtype`, if there are several.

  Only on a single device, where packing moves no data between devices.
  """
  if not single_device():
    return None
  index, parts, total = [], [], 0
  for i, x in enumerate(leaves):
    if x.size < _SMALL and total + x.size <= _PACK_LIMIT:
      index.append(i)
      total += x.size
      parts.append(_flat_real(x, dtype))
  if len(index) < 2:
    return None
  sizes = [p.size for p in parts]
  data = jnp.concatenate(parts)
  # The barrier keeps XLA from fusing the concatenation into its reductions.
  return Packed(tuple(index), lax.optimization_barrier(data),
                np.repeat(np.arange(len(sizes)), sizes))


def per_leaf_sums(leaves: Sequence[jax.Array], pack: Packed | None,
                  leaf_sum: Callable[[jax.Array], jax.Array],
                  elementwise: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """A vector of ``leaf_sum(x)`` per leaf, in leaf order.

  The leaves in `pack` are summed together, as ``elementwise`` of the
  packed elements summed per leaf: ``elementwise`` must give what
  ``leaf_sum`` sums.
  """
  inside = set(pack.index) if pack else set()
  rest = [i for i in range(len(leaves)) if i not in inside]
  parts = [_numerics.stack_scalars([leaf_sum(leaves[i]) for i in rest])
           ] if rest else []
  if pack:
    parts.append(jax.ops.segment_sum(
        elementwise(pack.data), pack.segment, len(pack.index),
        indices_are_sorted=True))
  sums = jnp.concatenate(parts)
  order = np.argsort(rest + list(pack.index if pack else ()))
  return sums if np.all(order == np.arange(len(order))) else sums[order]


def leaf_sums(leaves: Sequence[jax.Array], dtype,
              psum: Callable[[jax.Array], jax.Array]):
  """`_numerics.leaf_sums` with the overflow sum in a conditional."""
  leaves = [vector(x) for x in leaves]
  pack = pack_small(leaves, dtype)

  def sums(k):
    return per_leaf_sums(leaves, pack,
                         lambda x: _numerics.sumsq(x, dtype, k),
                         lambda y: jnp.square(y if k is None else y * k))

  q = psum(sums(None))
  qd = lax.cond(
      jnp.sum(q) < jnp.inf,
      lambda: q,  # Not used where the sums are in range.
      lambda: psum(sums(_numerics.down(dtype))),
  )
  return q, qd


def apart(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """``f(x)`` in a computation of its own, which XLA:CPU does not fuse.

  `x` is a scalar; a conditional on a value XLA cannot fold keeps ``f`` out
  of the loops around it. Where `x` is NaN the result is NaN.
  """
  out = jax.eval_shape(f, x)
  nan = lambda x: jnp.full(out.shape, jnp.nan, out.dtype)
  if _in_shard_map():
    # There `f`'s result varies from device to device and the NaN does not,
    # and `cond` wants both branches alike: computed in line instead.
    return jnp.where(x == x, f(x), nan(x))
  x = lax.optimization_barrier(x)
  return lax.cond(x == x, f, nan, x)


def has_axis_type(mesh, kind: str) -> bool:
  """Whether `mesh` (or None) has an axis of `jax.sharding.AxisType` `kind`.

  False on a jax without axis types.
  """
  axis_type = getattr(getattr(jax.sharding, "AxisType", None), kind, None)
  return (axis_type is not None
          and axis_type in getattr(mesh, "axis_types", ()))


def _in_shard_map() -> bool:
  """Whether the computation being traced is inside `shard_map`."""
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  return get_mesh is not None and has_axis_type(get_mesh(), "Manual")


_GROUPED_LIMIT = 1 << 21  # Leaves this large keep their own reduction ...
_GROUP = 64  # ... the others are reduced together, this many at a time ...
_GROUP_SIZE = 1 << 24  # ... and at most this many elements (a leaf over it,
# possible only with a limit above half of it, would be a group alone): a
# copy, were XLA ever not to fuse the concatenation, stays within 64 MB.


def grouped_sums(leaves: Sequence[jax.Array], dtype
                 ) -> tuple[jax.Array, jax.Array]:
  """Sums of squares of all `leaves` together, plain and scaled down.

  As `_numerics.sumsq_pair` gives them, in `dtype`. Leaves under
  `_GROUPED_LIMIT` elements are flattened and concatenated (complex leaves
  as their real and imaginary parts), up to `_GROUP` leaves and
  `_GROUP_SIZE` elements at a time, and each concatenation is one
  reduction, into which XLA fuses the concatenation. Only on a single
  device: concatenating leaves sharded apart would gather them.
  """
  arrays, group = [], []

  def close():
    if group:
      arrays.append(group[0] if len(group) == 1 else jnp.concatenate(group))
      group.clear()

  size = 0  # Elements in `group`.
  for x in leaves:
    if x.size >= _GROUPED_LIMIT:
      arrays.append(x)
      continue
    y = _flat_real(x, dtype)
    if len(group) == _GROUP or size + y.size > _GROUP_SIZE:
      close()
      size = 0
    group.append(y)
    size += y.size
  close()
  k = _numerics.down(dtype)
  sums = [_numerics.sumsq_pair(x, dtype, k) for x in arrays]
  return (sum((q for q, _ in sums[1:]), sums[0][0]),
          sum((qd for _, qd in sums[1:]), sums[0][1]))
