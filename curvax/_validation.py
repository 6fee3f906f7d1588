"""Construction-time argument checks with messages that name the argument."""

from __future__ import annotations

import math


def check_positive(name: str, value: float) -> None:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def check_fraction(name: str, value: float) -> None:
  """``0 < value < 1`` (decay and shrink factors)."""
  if not (isinstance(value, (int, float)) and 0 < value < 1):
    raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}.")
