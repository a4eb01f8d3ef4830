"""Argument checks shared by every strategy.

Concrete values (Python numbers, numpy and concrete jax scalars) are checked
when a transformation is built. Traced values, which is what
`optax.inject_hyperparams` passes when it re-calls a factory inside `update`,
are let through unchecked: they cannot be inspected without a host sync, and
the transformations treat them defensively instead (a negative traced threshold
acts as zero).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import math
import numbers
from typing import Any

import jax
import numpy as np


def entries(name: str, value: Any, expected: str, hint: str = "") -> list:
  """The items of a mapping, or the elements of any other iterable.

  Raises TypeError for anything else, a string included: "`name` must be
  `expected`, got ...", then `hint`.
  """
  if isinstance(value, str) or not isinstance(value, (Mapping, Iterable)):
    raise TypeError(f"`{name}` must be {expected}, got {value!r}{hint}.")
  return list(value.items()) if isinstance(value, Mapping) else list(value)


def concrete_float(name: str, value: Any, expected: str) -> float | None:
  """Returns `value` as a float, None if it is traced; raises if not a number."""
  if isinstance(value, jax.core.Tracer):
    return None
  bad = ValueError(f"`{name}` must be {expected}, got {value!r}.")
  if isinstance(value, (bool, np.bool_)):
    raise bad
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    arr = np.asarray(value)
    # `jnp.issubdtype`: numpy's does not know bfloat16 as a float.
    if arr.shape != () or not (
        jax.numpy.issubdtype(arr.dtype, jax.numpy.floating)
        or jax.numpy.issubdtype(arr.dtype, jax.numpy.integer)
    ):
      raise bad
    return float(arr)
  raise bad


def check_number(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    expected: str,
) -> None:
  """Raises ValueError unless `value` is a real scalar within the bounds.

  NaN is always rejected. `expected` completes the sentence
  "`name` must be ..." in the error message.
  """
  v = concrete_float(name, value, expected)
  if v is None:
    return
  above = v > low if low_open else v >= low
  below = v < high if high_open else v <= high
  if not (above and below):  # NaN fails both comparisons.
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


def check_threshold(name: str, value: Any) -> None:
  """A clipping threshold: a non-negative number (``inf`` allowed)."""
  check_number(name, value, low=0.0, expected="a non-negative number")


def check_percentile(name: str, value: Any) -> None:
  """A percentile: a number in [0, 100]."""
  check_number(name, value, low=0.0, high=100.0,
               expected="a number in [0, 100]")


def check_optional_threshold(name: str, value: Any) -> None:
  if value is not None:
    check_threshold(name, value)


def _check_static(name: str, value: Any) -> None:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"`{name}` fixes the shape of the state, so it cannot be traced; got"
        f" {value!r}. With `optax.inject_hyperparams`, list it in"
        f" `static_args=({name!r},)`."
    )


def check_bool(name: str, value: Any) -> bool:
  """A structural flag: a concrete bool."""
  _check_static(name, value)
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool, got {value!r}.")
  return bool(value)


def check_int(name: str, value: Any, *, low: int) -> int:
  """A structural integer (fixes a shape): a concrete int >= `low`."""
  _check_static(name, value)
  if isinstance(value, (np.ndarray, jax.Array)) and value.shape == ():
    value = value.item()
  if (
      isinstance(value, (bool, np.bool_))
      or not isinstance(value, (numbers.Integral, np.integer))
      or value < low
  ):
    raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
  return int(value)


def check_float_leaves(
    tree: Any, argument: str = "params", *, real: bool = False
) -> None:
  """Raises TypeError naming the first leaf that is not floating-point.

  Complex leaves are accepted unless `real`.
  """
  kind = jax.numpy.floating if real else jax.numpy.inexact
  leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in leaves_with_path:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, kind):
      raise TypeError(
          f"This clipping needs {'real ' if real else ''}floating-point"
          f" leaves, but `{argument}`"
          f" has leaf {jax.tree_util.keystr(path) or '<root>'} of dtype"
          f" {dtype if dtype is not None else type(leaf).__name__}."
      )
