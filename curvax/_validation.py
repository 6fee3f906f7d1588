"""Argument checks with messages that name the argument, and hyperparameter schedules.

Numeric hyperparameters are accepted as Python numbers, NumPy scalars or 0-d JAX arrays
(``optax.inject_hyperparams`` passes arrays) and are validated when their value is
known; a traced value (a hyperparameter injected inside ``jax.jit``) is taken as given.
Booleans are refused: ``damping=True`` is a mistake, not ``1.0``. Hyperparameters that
may change during training also accept an ``optax.Schedule`` (``count -> value``), as
optax's own optimisers do; :func:`value_at` evaluates one at a step count.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import numpy as np

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], Any]]


def _concrete(name: str, value: Any, *, schedule: bool) -> Optional[float]:
  """``value`` as a float, or ``None`` for a schedule or a traced value."""
  if callable(value):
    if not schedule:
      raise TypeError(f"{name} does not accept a schedule (a callable); pass a number.")
    return None
  if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == bool:
    raise TypeError(f"{name} must be a number, got the boolean {value!r}.")
  if isinstance(value, jax.core.Tracer):
    if value.shape != ():
      raise ValueError(f"{name} must be a scalar, got shape {value.shape}.")
    return None
  try:
    array = np.asarray(value)
  except Exception:  # e.g. a string or None
    array = None
  if array is None or array.shape != () or not np.issubdtype(array.dtype, np.number):
    raise TypeError(f"{name} must be a number (a Python, NumPy or 0-d JAX scalar), got "
                    f"{value!r}.")
  return float(array)


def check_positive(name: str, value: Any, *, schedule: bool = False) -> None:
  """``value > 0`` and finite (or, with ``schedule``, a callable ``count -> value``)."""
  number = _concrete(name, value, schedule=schedule)
  if number is not None and not (math.isfinite(number) and number > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def check_fraction(name: str, value: Any, *, schedule: bool = False) -> None:
  """``0 < value < 1`` (decay and shrink factors)."""
  number = _concrete(name, value, schedule=schedule)
  if number is not None and not 0 < number < 1:
    raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}.")


def check_in_range(name: str, value: Any, low: float, high: float, *,
                   schedule: bool = False) -> None:
  """``low <= value <= high``."""
  number = _concrete(name, value, schedule=schedule)
  if number is not None and not low <= number <= high:
    raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}.")


def static_fraction(name: str, value: Any, argument: str) -> float:
  """A fraction in ``(0, 1]`` that sets a sub-batch's shape, so a known number: never
  traced (``argument``, its keyword, for the ``inject_hyperparams`` hint), never a
  boolean or a non-number."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name}: {argument} sets the sub-batch's shape and cannot be "
                     f"traced; with optax.inject_hyperparams pass "
                     f"static_args='{argument}'.")
  array = None if isinstance(value, (bool, str)) or value is None else np.asarray(value)
  if (array is None or array.shape != () or not np.issubdtype(array.dtype, np.number)
      or not 0 < float(array) <= 1):
    raise ValueError(f"{name}: {argument} must be a number in (0, 1], got {value!r}.")
  return float(array)


def concrete_value(value: Any) -> Optional[float]:
  """``value`` as a float when it is a known number, ``None`` for schedules and tracers
  (for cross-argument checks such as ``min_damping <= damping``)."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  return float(np.asarray(value))


def check_within(name: str, value: Any, low: Any, high: Any, *,
                 bounds: str = "[min_damping, max_damping]") -> None:
  """``low <= value <= high`` for whichever of the three are known numbers (an initial
  damping within its bounds; schedules and traced values are not checked)."""
  number, lowest, highest = (concrete_value(v) for v in (value, low, high))
  if number is not None and ((lowest is not None and number < lowest)
                             or (highest is not None and number > highest)):
    raise ValueError(f"{name} must lie in {bounds} = [{low}, {high}], got {value!r}.")


def value_at(value: ScalarOrSchedule, count: jax.Array) -> Any:
  """A hyperparameter's value at step ``count`` (a schedule is called, a number kept)."""
  return value(count) if callable(value) else value


def check_integer(name: str, value: Any, least: int) -> Optional[int]:
  """An integer hyperparameter ``>= least`` that may be traced (e.g. a rule's period,
  which ``optax.inject_hyperparams`` turns into an array): a Python/NumPy integer or an
  integer 0-d JAX array. Returns its value, or ``None`` when it is traced."""
  if isinstance(value, (bool, np.bool_)) or callable(value):
    raise TypeError(f"{name} must be an integer, got {value!r}.")
  dtype = getattr(value, "dtype", None)
  integral = (isinstance(value, (int, np.integer)) if dtype is None
              else np.issubdtype(dtype, np.integer) and np.ndim(value) == 0)
  if not integral:
    raise TypeError(f"{name} must be an integer, got {value!r}.")
  number = concrete_value(value)
  if number is None:
    return None
  if number < least:
    disabled = " (0 disables the rule)" if least == 0 else ""
    raise ValueError(f"{name} must be an integer >= {least}{disabled}, got {value!r}.")
  return int(number)


def static_int(name: str, value: Any, default: int, *, minimum: int = 1) -> int:
  """An integer hyperparameter that fixes array shapes or loop lengths, ``>= minimum``.

  ``None`` means ``default``; NumPy and concrete 0-d JAX integers are accepted; a traced
  value (``optax.inject_hyperparams`` without ``static_args``) is refused with the fix.
  """
  if value is None:
    return default
  if isinstance(value, jax.core.Tracer) or callable(value):
    raise TypeError(f"{name} fixes array shapes and must be a concrete integer; under "
                    f"optax.inject_hyperparams pass static_args=({name!r},).")
  array = np.asarray(value)
  if (isinstance(value, (bool, np.bool_)) or array.shape != ()
      or not np.issubdtype(array.dtype, np.integer) or int(array) < minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(array)
