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


def concrete_value(value: Any) -> Optional[float]:
  """``value`` as a float when it is a known number, ``None`` for schedules and tracers
  (for cross-argument checks such as ``min_damping <= damping``)."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  return float(np.asarray(value))


def value_at(value: ScalarOrSchedule, count: jax.Array) -> Any:
  """A hyperparameter's value at step ``count`` (a schedule is called, a number kept)."""
  return value(count) if callable(value) else value
