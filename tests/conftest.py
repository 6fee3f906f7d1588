"""Shared fixtures: precision switching and tolerances per dtype.

Eight host CPU devices for the data-parallel tests: XLA reads the flag when the backend
starts, which is after this file is imported and before any test runs.
"""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()

import jax  # noqa: E402  (after the flag)
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


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
