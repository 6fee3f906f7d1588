"""Shared fixtures: precision switching and tolerances per dtype."""

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """Runs a test in float32 and again with ``jax_enable_x64`` in float64."""
  if request.param == "float64":
    with jax.enable_x64(True):
      yield jnp.float64
  else:
    yield jnp.float32


def tolerance(dtype) -> dict:
  """``rtol``/``atol`` for comparing against dense references in ``dtype``."""
  if dtype == jnp.float64:
    return dict(rtol=1e-9, atol=1e-10)
  return dict(rtol=2e-4, atol=2e-5)
