"""Norms and scaling shared by every strategy.

Squared norms accumulate in float32 (or the leaf's own dtype where wider) and
are overflow-safe without slowing the common case:

1. One pass computes every leaf's sum of squares of ``x``.
2. Only if a sum is not finite (or, for the global norm, the whole tree's sum
   is below the float32 normal range) does a second pass run, on ``x * k``
   with ``k`` a power of two (``2**-100`` or ``2**100``) that brings the sums
   into range.

Large leaves' first pass is a plain convert-square-sum (XLA:CPU runs a
reduction with a runtime scalar operand several times slower), and their
second sits in a `lax.cond` branch that costs nothing unless taken. Small
leaves' reductions serve both passes (see `_in_range_then`) and, on a single
device, are one reduction of the leaves packed together (`pack_small`),
which keeps compile time down. Multiplying by a power of two is exact, and
results are applied as ``(x * k) * c``, so a gradient of any finite size is
scaled in its own direction and never to zero or NaN.

The per-leaf sums are gathered by `stack_scalars`, which keeps compile time
linear in the number of leaves.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

AxisName = Hashable | tuple[Hashable, ...] | None

_DOWN = 2.0**-100  # Brings a float32 sum of squares of any finite x in range.
_UP = 2.0**100  # Lifts squares that underflow float32 back into range.


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


def _single_device() -> bool:
  """Whether leaves may be reshaped or packed without moving data.

  Only on a single device: a leaf may be sharded wherever there are more
  (even when the trace cannot tell), and packing it, or flattening it when
  an inner axis is sharded, would gather it.
  """
  return jax.device_count() == 1


def _vector(x: jax.Array) -> jax.Array:
  """`x` flattened to a vector where that is free (on a single device).

  XLA:CPU runs reductions and elementwise kernels with scalar operands
  markedly slower over rank-4 arrays than over vectors: on a ResNet-like
  tree, a `global_norm` + SGD step took 1.2x optax's time with conv kernels
  scaled in their own shape and 1.01x flattened.
  """
  return x.ravel() if _single_device() else x


def _leaf_sumsq(
    leaves: Sequence[jax.Array], k: jax.Array | None, dtype
) -> tuple[jax.Array, ...]:
  """sum(|x * k|**2) for each leaf, in `dtype`, with one scalar `k` for all.

  With `k` None the leaves are not scaled. That is the common pass, and it
  must stay a plain convert-square-sum: XLA:CPU runs a reduction with a
  runtime scalar operand several times slower (20x for bfloat16 leaves).
  """
  sums = []
  for x in leaves:
    y = _vector(x).astype(compute_dtype(x.dtype))
    if k is not None:
      y = y * k.astype(y.dtype)
    if jnp.iscomplexobj(y):
      sq = jnp.square(y.real) + jnp.square(y.imag)
    else:
      sq = jnp.square(y)
    sums.append(jnp.sum(sq, dtype=dtype))
  return tuple(sums)


def stack_scalars(scalars: Sequence[jax.Array]) -> jax.Array:
  """Stacks per-leaf scalars into a vector, compiling in linear time.

  The barrier keeps XLA from fusing a many-operand stack into its consumer,
  which makes compile time grow quadratically with the number of leaves.
  """
  return lax.optimization_barrier(jnp.stack(scalars))


def _psum(x, axis_name: AxisName):
  return x if axis_name is None else lax.psum(x, axis_name)


def _in_range(q: jax.Array) -> jax.Array:
  return q < jnp.inf  # False for inf and NaN.


# Leaves with fewer elements are "small". XLA:CPU compiles a reduction of a
# small array to a loop that takes about ten times longer to compile than the
# library call it uses for larger ones, so small leaves get one set of
# reductions for both passes (the runtime factor costs them nothing), while
# large leaves keep a plain first pass, which runs faster.
_SMALL = 4096
# At most this many elements of small leaves are packed into one vector.
_PACK_LIMIT = 1 << 20


class Packed(NamedTuple):
  """Small leaves' elements in one vector, reduced with a single kernel.

  ``index`` lists the packed leaves; ``data`` holds their elements (real and
  imaginary parts apart) in leaf order; ``segment`` maps each element to its
  position in ``index``.
  """

  index: tuple[int, ...]
  data: jax.Array
  segment: np.ndarray


def pack_small(leaves: Sequence[jax.Array], dtype) -> Packed | None:
  """Packs the small leaves of `leaves` as `dtype`, if there are several.

  One reduction of the pack compiles in a fraction of the time of one per
  leaf; the pack copies at most ``_PACK_LIMIT`` leaf elements.
  """
  if not _single_device():
    return None
  index, parts, total = [], [], 0
  for i, x in enumerate(leaves):
    if x.size < _SMALL and total + x.size <= _PACK_LIMIT:
      index.append(i)
      total += x.size
      y = x.ravel()
      parts.append(jnp.concatenate([y.real, y.imag]) if jnp.iscomplexobj(y)
                   else y)
  if len(index) < 2:
    return None
  sizes = [p.size for p in parts]
  data = jnp.concatenate([p.astype(dtype) for p in parts])
  # The barrier keeps XLA from fusing the concatenation into its reductions.
  return Packed(tuple(index), lax.optimization_barrier(data),
                np.repeat(np.arange(len(sizes)), sizes))


def unpacked(leaves: Sequence[jax.Array], pack: Packed | None) -> list[int]:
  """Indices of the leaves outside `pack` (all of them if it is None)."""
  inside = set(pack.index) if pack else set()
  return [i for i in range(len(leaves)) if i not in inside]


def _in_range_then(leaves, axis_name, per_leaf, then):
  """``then(q, k)`` on squared norms brought into range; returns its result.

  `q` holds the sums of squares of ``x * k``: per leaf (a vector) with
  `per_leaf`, else the whole tree's total (a scalar); `k` is a power of two
  of the same shape. One pass computes the sums of squares of ``x``; if they
  are in range, ``k = 1`` and there is no second pass. Otherwise a second
  pass runs on ``x * 2**-100`` (a sum overflowed: with `per_leaf` any
  leaf's, else the total) or, unless `per_leaf`, on ``x * 2**100`` (the
  total underflowed); with `per_leaf` only the leaves that overflowed take
  its sums.

  Both passes are iterations of one loop, so small leaves' reductions
  compile once (on a single device, as one reduction of their pack). A large
  leaf's first pass is a plain reduction outside the loop, and its second
  sits in a `lax.cond` branch: it costs nothing unless taken. `then` runs in
  the loop, so its results are materialized once: each leaf's scaling kernel
  reads its factors rather than recomputing them from the sums.
  """
  dtype = norm_dtype(leaves)
  pack = pack_small(leaves, dtype)
  large_index = [i for i, x in enumerate(leaves) if x.size >= _SMALL]
  large = [leaves[i] for i in large_index]
  rest = [i for i in unpacked(leaves, pack) if leaves[i].size < _SMALL]
  large_first = _leaf_sumsq(large, None, dtype)
  one = jnp.ones((), dtype)
  # Sums come out as [large leaves, other small leaves, pack]: to leaf order.
  order = np.argsort(large_index + rest + list(pack.index if pack else ()))
  n_sums = len(leaves) if per_leaf else len(large) + len(rest) + bool(pack)

  def sums(k):
    """Per-leaf sums of squares of ``x * k``, in leaf order."""
    q = list(lax.cond(
        k == 1, lambda: large_first, lambda: _leaf_sumsq(large, k, dtype)
    ) if large else ())
    q += _leaf_sumsq([leaves[i] for i in rest], k, dtype)
    q = [stack_scalars(q)] if q else []
    if pack:
      sq = jnp.square(pack.data * k)
      q.append(jax.ops.segment_sum(sq, pack.segment, len(pack.index),
                                   indices_are_sorted=True)
               if per_leaf else jnp.sum(sq)[None])
    q = jnp.concatenate(q)
    if per_leaf and np.any(order != np.arange(len(order))):
      q = q[order]
    return _psum(q, axis_name)

  def body(carry):
    k, first, _, _ = carry
    q = sums(k)
    is_first = k == 1
    first = jnp.where(is_first, q, first)
    if per_leaf:
      ok = _in_range(first)
      out = then(jnp.where(ok, first, q), jnp.where(ok, 1, k))
      again = is_first & ~jnp.all(ok)
      next_k = jnp.asarray(_DOWN, dtype)
    else:
      total = jnp.sum(q)
      out = then(total, k)
      again = is_first & (~_in_range(total) | (total < jnp.finfo(dtype).tiny))
      next_k = jnp.where(_in_range(total), jnp.asarray(_UP, dtype),
                         jnp.asarray(_DOWN, dtype))
    return jnp.where(again, next_k, k), first, out, again

  first = jnp.zeros((n_sums,), dtype)
  q0 = first if per_leaf else first[0]
  out = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                     jax.eval_shape(then, q0, q0))
  init = _vary_like((one, first, out, jnp.ones((), bool)), leaves, axis_name)
  # A scan of two steps, each running only if asked to, rather than a
  # `lax.while_loop`: reverse-mode autodiff goes through it.
  step = lambda c, _: (lax.cond(c[3], body, lambda c: c, c), None)
  return lax.scan(step, init, length=2)[0][2]


def _vary_like(values, leaves, axis_name: AxisName):
  """Marks constant `values` as varying like the norms of `leaves`.

  Under `shard_map`, a loop's initial carry must vary over the same mesh axes
  as its body's results: those the leaves vary over, less `axis_name`.
  """
  if not hasattr(lax, "pcast"):  # Older JAX does not track this.
    return values
  axes = set()
  for x in leaves:
    kind = getattr(jax.typeof(x), "manual_axis_type", None)
    axes |= set(kind.varying) if kind is not None else set()
  axes -= set(axis_name if isinstance(axis_name, tuple) else (axis_name,))
  if not axes:
    return values
  return jax.tree.map(lambda v: lax.pcast(v, tuple(axes), to="varying"),
                      values)


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


def _empty_norm(per_leaf: bool) -> Norm:
  zero = jnp.zeros((0,) if per_leaf else (), jnp.float32)
  return Norm(zero, zero, jnp.ones_like(zero))


def global_norm(leaves: Sequence[jax.Array], axis_name: AxisName = None) -> Norm:
  """The L2 norm of all `leaves` together (psum'd over `axis_name`)."""
  if not leaves:
    return _empty_norm(False)
  return _in_range_then(leaves, axis_name, False, _norm)


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
  if not leaves:
    norm = _empty_norm(per_leaf)
    return norm, clip_to(norm, threshold)

  def then(q, k):
    norm = _norm(q, k)
    return norm, clip_to(norm, threshold)

  return _in_range_then(leaves, axis_name, per_leaf, then)


def total_norm(norms: Norm) -> Norm:
  """The norm of all leaves from their per-leaf norms, without overflow."""
  if not norms.scaled.size:
    return _empty_norm(False)
  q = jnp.square(norms.scaled)
  k = norms.k
  # Bring every leaf to the smallest k. The ratios are exact powers of two
  # (1 or 2**-100) and are applied one at a time, since their squares could
  # underflow where the products do not.
  kmin = jnp.min(k)
  ratio = kmin / k
  terms = q * ratio * ratio
  total = jnp.sum(terms)
  # Every per-leaf sum is finite, yet their total may still overflow.
  overflow = ~_in_range(total) & jnp.all(_in_range(q))
  down = jnp.asarray(_DOWN, q.dtype)
  total = jnp.where(overflow, jnp.sum(terms * down * down), total)
  return _norm(total, jnp.where(overflow, kmin * down, kmin))


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
  unchanged, bit for bit. A negative or NaN `threshold` (possible only when
  traced) acts as zero or as no threshold, respectively.
  """
  t = jnp.maximum(jnp.asarray(threshold, norm.scaled.dtype), 0)
  clipped = _in_range(norm.scaled) & (norm.value > t)
  one = jnp.ones_like(norm.scaled)
  # `scaled > t * k >= 0` wherever clipped, so the quotient is finite.
  c = jnp.where(clipped, t / jnp.where(clipped, norm.scaled, one), one)
  return Scale(clipped, jnp.where(clipped, norm.k, one), c)


def scale_leaf(x: jax.Array, k: jax.Array, c: jax.Array) -> jax.Array:
  """``(x * k) * c`` computed in at least float32, cast back to x's dtype.

  Two factors rather than their product, which may underflow where the
  result does not.
  """
  ct = compute_dtype(x.dtype)
  y = _vector(x).astype(ct)
  return ((y * k.astype(ct)) * c.astype(ct)).astype(x.dtype).reshape(x.shape)


def as_f32(x: jax.typing.ArrayLike) -> jax.Array:
  """A metric scalar, stored as float32 whatever the leaves' dtypes."""
  return jnp.asarray(x).astype(jnp.float32)
