"""Small degenerate problems of CurveBall's Table 1 (curveball.md §5.1).

Each is written as residuals ``r(w)`` so that the objective is a squared error
``Σ r(w)²`` — the form every curvax solver consumes with ``loss='squared_error'`` and
zero targets, and the form Levenberg-Marquardt needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


def rosenbrock_residuals(w: jax.Array, eps: jax.Array | float = 1.0) -> jax.Array:
  """``[1 − u, 10 √ε (v − u²)]``: their squares sum to R(u, v) of eq. 20."""
  u, v = w[0], w[1]
  return jnp.stack([1.0 - u, 10.0 * jnp.sqrt(eps) * (v - u * u)])


def rosenbrock(w: jax.Array, eps: jax.Array | float = 1.0) -> jax.Array:
  """R(u, v) = (1 − u)² + 100 ε (v − u²)² (eq. 20); ε = 1 is the classic function."""
  return jnp.sum(jnp.square(rosenbrock_residuals(w, eps)))


def stochastic_rosenbrock(w: jax.Array, key: jax.Array, low: float = 0.0,
                          high: float = 1.0) -> jax.Array:
  """Eq. 20 with a fresh ε ~ U[low, high] drawn from ``key`` at each evaluation."""
  if not 0.0 <= low <= high:
    raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
  eps = jax.random.uniform(key, (), minval=low, maxval=high)
  return rosenbrock(w, eps)


@dataclasses.dataclass(frozen=True)
class LinearRegressionProblem:
  """Fit ``targets = inputs @ Aᵀ`` with ``predict(params, inputs)``."""
  inputs: jax.Array
  targets: jax.Array
  matrix: jax.Array
  predict: Callable[[Any, jax.Array], jax.Array]
  init_params: Callable[[jax.Array], Any]


def _two_layer_linear(params, inputs):
  return inputs @ params["w1"].T @ params["w2"].T


def rahimi_recht(key: jax.Array, *, dim: int = 6, num_examples: int = 1000,
                 condition_number: float = 1e5) -> LinearRegressionProblem:
  """Rahimi & Recht's deep linear problem (curveball.md ref. 18): y = A x, ŷ = W₂ W₁ x.

  ``A = U diag(s) Vᵀ`` with random orthogonal U, V and singular values spaced
  geometrically from 1 to ``1 / condition_number``; inputs x ~ N(0, I).
  """
  if condition_number < 1:
    raise ValueError(f"condition_number must be >= 1, got {condition_number}")
  k_u, k_v, k_x = jax.random.split(key, 3)
  u, _ = jnp.linalg.qr(jax.random.normal(k_u, (dim, dim)))
  v, _ = jnp.linalg.qr(jax.random.normal(k_v, (dim, dim)))
  singular = jnp.logspace(0.0, -jnp.log10(condition_number), dim)
  matrix = (u * singular) @ v.T
  inputs = jax.random.normal(k_x, (num_examples, dim))

  def init_params(init_key):
    k1, k2 = jax.random.split(init_key)
    scale = 1.0 / jnp.sqrt(dim)
    return {"w1": scale * jax.random.normal(k1, (dim, dim)),
            "w2": scale * jax.random.normal(k2, (dim, dim))}

  return LinearRegressionProblem(inputs, inputs @ matrix.T, matrix, _two_layer_linear,
                                 init_params)
