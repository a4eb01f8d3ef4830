"""Norms and scaling shared by every strategy.

Guarantees, on every backend:

- **Wide accumulation.** Squared norms accumulate in float32 (float64 when a
  leaf is float64), never in a float16 or bfloat16 leaf's own dtype, and
  leaves are scaled in at least float32, then rounded back to their dtype.
- **No overflow.** Each leaf whose squares could overflow the accumulator
  also has the sum of squares of ``x * k``, with ``k`` a power of two
  (`down`) small enough that no finite element overflows. Where the plain
  sum (of a leaf, or of the whole tree) is not finite, that second sum is
  used, and the leaf is scaled as ``(x * k) * c``. Powers of two scale
  exactly, so finite updates of any size keep their direction and are never
  scaled to zero or NaN.
- **No control flow on data.** The choice is a `jnp.where`. On GPU and TPU
  both sums are reduced in one read of each leaf, and the update is
  straight-line code: no device-to-host sync. Each leaf is read in its own
  shape and layout, except that on a single CUDA GPU the global norm
  reduces small leaves together. XLA:CPU runs a second sum at a cost, so
  there it runs only when the first overflowed. The platforms' tactics live
  in `_tactics`.
- **Non-finite input passes through.** A NaN or Inf makes the norm non-finite,
  and the factors are then exactly one.
- **Invalid thresholds are visible.** A negative or NaN threshold (possible
  only when traced) makes every factor NaN.

Limits:

- Squares below float32's normal range flush to zero (XLA flushes subnormals
  on CPU and GPU): a norm below about 1e-19 reads as 0, so a threshold in
  (0, 1e-19) does not clip it. A threshold of exactly 0 zeroes every update.
- A float64 leaf's second sum covers every finite float64.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from optax_clipkit import _tactics

AxisName = Hashable | tuple[Hashable, ...] | None


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype arithmetic on a leaf of `dtype` runs in (at least float32)."""
  dtype = jnp.dtype(dtype)
  if jnp.finfo(dtype).bits >= 32:
    return dtype
  return jnp.dtype(jnp.complex64 if jnp.iscomplexobj(dtype.type(0)) else
                   jnp.float32)


def norm_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
  """Real dtype in which squared norms of `leaves` accumulate."""
  bits = max([32] + [jnp.finfo(x.dtype).bits for x in leaves])
  return jnp.dtype(jnp.float64 if bits > 32 else jnp.float32)


def down(dtype) -> jax.Array:
  """A power of two that brings the square of any finite `dtype` in range.

  2**-100 for float32: ``(3.4e38 * 2**-100)**2`` is about 2**56, leaving
  room for sums over 2**70 elements. Behind an optimization barrier, so that
  XLA cannot fold ``k * k`` (zero in float32) into a product with it.
  """
  k = 2.0 ** -(jnp.finfo(dtype).maxexp // 2 + 36)
  return lax.optimization_barrier(jnp.asarray(k, dtype))


def may_overflow(x: jax.Array, dtype) -> bool:
  """Whether a sum of squares of `x`'s elements can overflow `dtype`.

  The squares are taken in `dtype`'s precision at least (`_squares`).
  """
  largest = float(jnp.finfo(compute_dtype(x.dtype)).max)
  bits = 2 * math.log2(largest) + math.log2(max(x.size, 1))
  return bits >= jnp.finfo(dtype).maxexp


def _squares(x: jax.Array, dtype, k: jax.Array | None = None) -> jax.Array:
  """|x * k|**2 elementwise (``k = 1`` if None).

  In x's compute dtype, or in `dtype`'s precision where that is wider: a
  float32 leaf summed in float64 is squared in float64, where no finite
  float32 overflows.
  """
  ct = compute_dtype(x.dtype)
  if jnp.finfo(ct).bits < jnp.finfo(dtype).bits:
    ct = jnp.dtype(jnp.complex128 if jnp.iscomplexobj(ct.type(0)) else dtype)
  y = x.astype(ct)
  if k is not None:
    y = y * k.astype(y.dtype)
  if jnp.iscomplexobj(y):
    return jnp.square(y.real) + jnp.square(y.imag)
  return jnp.square(y)


def sumsq(x: jax.Array, dtype, k: jax.Array | None = None) -> jax.Array:
  """sum(|x * k|**2) in `dtype` (``k = 1`` if None)."""
  return jnp.sum(_squares(x, dtype, k), dtype=dtype)


def sumsq_pair(x: jax.Array, dtype, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sumsq(x), sumsq(x, k))`` in one reduction of two accumulators.

  One variadic reduce rather than two sibling sums, which XLA:GPU fuses into
  a slower kernel with two outputs: on an H200 the norm pass of a 270M
  float32 tree read 3.26 TB/s this way, 2.94-3.09 as two sums, and optax's
  single sum 3.25 (jax 0.11.2, the first run of 2026-11-26;
  ``docs/numerics.md``).
  """
  zero = jnp.zeros((), dtype)
  return lax.reduce(
      (_squares(x, dtype).astype(dtype), _squares(x, dtype, k).astype(dtype)),
      (zero, zero),
      lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(x.ndim)))


def stack_scalars(scalars: Sequence[jax.Array]) -> jax.Array:
  """Stacks per-leaf scalars into a vector, compiling in linear time.

  The barrier keeps XLA from fusing a many-operand stack into its consumer,
  which makes compile time grow quadratically with the number of leaves.
  """
  return lax.optimization_barrier(jnp.stack(scalars))


def _portable_sums(leaves: Sequence[jax.Array], dtype):
  """Per-leaf sums of squares of ``x`` and of ``x * down(dtype)``.

  Both sums of a leaf come from one read of it, in the leaf's own shape.
  Leaves that cannot overflow take ``q * k * k`` from their plain sums `q`
  (each factor applied apart: ``k * k`` underflows).
  """
  k = down(dtype)
  pairs = [sumsq_pair(x, dtype, k) if may_overflow(x, dtype)
           else (sumsq(x, dtype), None) for x in leaves]
  q = stack_scalars([a for a, _ in pairs])
  kk = (q * k) * k
  index = [i for i, (_, b) in enumerate(pairs) if b is not None]
  if not index:
    return q, kk
  return q, kk.at[jnp.asarray(index)].set(
      stack_scalars([pairs[i][1] for i in index]))


def leaf_sums(leaves: Sequence[jax.Array], axis_name: AxisName,
              total: bool = False):
  """``(q, qd)``: per-leaf sums of squares of ``x`` and ``x * down``.

  Vectors in leaf order, `psum`'d over `axis_name`; with `total`, scalars
  summed over all leaves. `qd` is exact wherever the plain sums' total is not
  finite; elsewhere it may be anything finite.
  """
  dtype = norm_dtype(leaves)
  psum = (lambda v: v) if axis_name is None else (
      lambda v: lax.psum(v, axis_name))
  add = jnp.sum if total else (lambda v: v)

  def portable(*leaves):
    q, qd = _portable_sums(leaves, dtype)
    return psum(add(q)), psum(add(qd))

  def cpu(*leaves):
    q, qd = _tactics.leaf_sums(leaves, dtype, psum)
    return add(q), add(qd)

  def cuda(*leaves):
    if not _tactics.single_device():
      return portable(*leaves)
    q, qd = _tactics.grouped_sums(leaves, dtype)
    return psum(q), psum(qd)

  return _tactics.dispatch(cpu, portable, *leaves,
                           cuda=cuda if total else None)


def _in_range(q: jax.Array) -> jax.Array:
  return q < jnp.inf  # False for inf and NaN.


class Norm(NamedTuple):
  """An L2 norm in a form that survives overflow.

  ``value`` is the norm itself (inf only when the true norm is beyond the
  dtype's range or the input is not finite); ``scaled`` is ``value * k`` for
  the power of two ``k``, and is finite whenever the input is. The fields are
  scalars, or vectors with one entry per leaf.
  """

  value: jax.Array
  scaled: jax.Array
  k: jax.Array


def _norm(q: jax.Array, k: jax.Array) -> Norm:
  scaled = jnp.sqrt(q)
  return Norm(scaled / k, scaled, k)


def _pick(q: jax.Array, qd: jax.Array, dtype) -> Norm:
  """The norm from `q` where it is finite, else from `qd`."""
  ok = _in_range(q)
  k = jnp.where(ok, jnp.ones((), dtype), down(dtype))
  return _norm(jnp.where(ok, q, qd), k)


def _empty_norm(per_leaf: bool) -> Norm:
  zero = jnp.zeros((0,) if per_leaf else (), jnp.float32)
  return Norm(zero, zero, jnp.ones_like(zero))


def norms(leaves: Sequence[jax.Array], axis_name: AxisName = None,
          per_leaf: bool = False) -> Norm:
  """The L2 norm of all `leaves` together, or of each with `per_leaf`.

  Squared norms are `psum`'d over `axis_name` (under `shard_map`/`pmap`).
  """
  if not leaves:
    return _empty_norm(per_leaf)
  q, qd = leaf_sums(leaves, axis_name, total=not per_leaf)
  return _pick(q, qd, norm_dtype(leaves))


def global_norm(leaves: Sequence[jax.Array], axis_name: AxisName = None) -> Norm:
  """The L2 norm of all `leaves` together (psum'd over `axis_name`)."""
  return norms(leaves, axis_name)


def clip_norms(
    leaves: Sequence[jax.Array],
    threshold: jax.typing.ArrayLike,
    axis_name: AxisName = None,
    per_leaf: bool = False,
) -> tuple[Norm, "Scale"]:
  """The norm of `leaves` and the factors that clip it to `threshold`.

  With `per_leaf`, one norm per leaf (the fields are vectors); else one
  norm of the whole tree (scalars).
  """
  norm = norms(leaves, axis_name, per_leaf)
  return norm, clip_to(norm, threshold)


def total_norm(norms: Norm) -> Norm:
  """The norm of all leaves from their per-leaf norms, without overflow."""
  if not norms.scaled.size:
    return _empty_norm(False)
  q = jnp.square(norms.scaled)
  k = norms.k
  # Bring every leaf to the smallest k. The ratios are exact powers of two
  # (1 or `down`) and are applied one at a time, since their squares could
  # underflow where the products do not.
  kmin = jnp.min(k)
  ratio = kmin / k
  terms = q * ratio * ratio
  total = jnp.sum(terms)
  # Every per-leaf sum is finite, yet their total may still overflow.
  overflow = ~_in_range(total) & jnp.all(_in_range(q))
  d = down(q.dtype)
  total = jnp.where(overflow, jnp.sum(terms * d * d), total)
  return _norm(total, jnp.where(overflow, kmin * d, kmin))


class Scale(NamedTuple):
  """Factors that map a leaf ``x`` to ``(x * k) * c``; ``applied`` is ``k*c``."""

  clipped: jax.Array
  k: jax.Array
  c: jax.Array

  @property
  def applied(self) -> jax.Array:
    return self.k * self.c


def clip_to(norm: Norm, threshold: jax.typing.ArrayLike) -> Scale:
  """Factors that scale `norm` down to `threshold` where it is above it.

  Where the norm is not finite because the input is not (NaN or Inf), or is
  at most the threshold, the factors are exactly one: the leaf passes through
  unchanged, bit for bit. A threshold of 0 zeroes every leaf, whatever its
  norm. A negative or NaN `threshold` (possible only when traced) makes `c`
  NaN, so the updates turn NaN rather than silently wrong.
  """
  t = jnp.asarray(threshold).astype(norm.scaled.dtype)
  finite = _in_range(norm.scaled)
  clipped = finite & (norm.value > t)
  one = jnp.ones_like(norm.scaled)
  # `scaled > t * k >= 0` wherever clipped, so the quotient is finite. A
  # threshold of 0 also zeroes norms too small to read as above it.
  c = jnp.where(clipped | (finite & (t == 0)),
                t / jnp.where(clipped, norm.scaled, one), one)
  c = jnp.where(t >= 0, c, jnp.nan)  # False for negative and NaN.
  return Scale(clipped, jnp.where(clipped, norm.k, one), c)


def scale_leaves(leaves: Sequence[jax.Array], scale: Scale) -> list[jax.Array]:
  """Each leaf as ``(x * k) * c``, in at least float32, in x's dtype.

  `scale`'s fields are scalars (one factor for all leaves) or vectors (one
  per leaf). Two factors rather than their product, which may underflow
  where the result does not.
  """
  if not leaves:
    return []
  per_leaf = jnp.ndim(scale.c) > 0

  def apply(*leaves, vector=lambda x: x):
    out = []
    for i, x in enumerate(leaves):
      k, c = (scale.k[i], scale.c[i]) if per_leaf else (scale.k, scale.c)
      # At least the factors' dtype: a float32 leaf in a tree with float64
      # leaves takes float64 factors, whose `k` may underflow float32.
      ct = np.promote_types(compute_dtype(x.dtype), k.dtype)
      y = vector(x).astype(ct)
      y = (y * k.astype(ct)) * c.astype(ct)
      out.append(y.astype(x.dtype).reshape(x.shape))
    return out

  cpu = lambda *leaves: apply(*leaves, vector=_tactics.vector)
  return _tactics.dispatch(cpu, apply, *leaves)


def as_f32(x: jax.typing.ArrayLike) -> jax.Array:
  """A metric scalar, stored as float32 whatever the leaves' dtypes."""
  return jnp.asarray(x).astype(jnp.float32)
