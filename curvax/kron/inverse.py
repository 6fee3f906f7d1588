"""Damped Kronecker inverses (kfra_kflr.md App. C.1).

The damped block ``Q̃ ⊗ 𝒢̃ + kI`` (eq. 35) is replaced by the factored Tikhonov damping

    (Q̃ + ω√k I) ⊗ (𝒢̃ + ω⁻¹√k I),   ω = √( (Tr Q̃ / dim Q̃) / (Tr 𝒢̃ / dim 𝒢̃) )   (eq. 36–38)

(trace norm), whose inverse applied to a gradient ``V`` (kernel as ``(in, out)``, bias as
an appended row, row-major ``vec``) is ``(Q̃ + ω√k I)⁻¹ V (𝒢̃ + ω⁻¹√k I)⁻¹`` — the identity
``(A ⊗ B)⁻¹ vec(V) = vec(A⁻¹ V B⁻¹)`` for symmetric ``A, B`` in this layout. As the
paper notes, this needs two positive-definite solves per layer (Cholesky here) instead
of the eigendecompositions the exact damped inverse would need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from curvax import damping as damping_lib

Array = jax.Array


def spd_inverse(matrix: Array) -> Array:
  """``M⁻¹`` of a symmetric positive-definite matrix by Cholesky."""
  factor = jsl.cho_factor(0.5 * (matrix + matrix.T), lower=True)
  return jsl.cho_solve(factor, jnp.eye(matrix.shape[0], dtype=matrix.dtype))


def factored_damping(q: Array, g: Array, damping: Array, *, q_dim: int,
                     g_dim: int) -> tuple[Array, Array]:
  """``(ω√k, ω⁻¹√k)`` for the factors ``Q̃`` and ``𝒢̃`` (eq. 36–38).

  ``q_dim``/``g_dim`` are the factors' true sizes (a reserved but unused bias slot of
  ``Q̃`` is not counted).
  """
  return damping_lib.factored_tikhonov(jnp.trace(q), q_dim, jnp.trace(g), g_dim, damping)


def damped_inverses(q: Array, g: Array, damping: Array, *, q_dim: int,
                    g_dim: int) -> tuple[Array, Array]:
  """``((Q̃ + ω√k I)⁻¹, (𝒢̃ + ω⁻¹√k I)⁻¹)`` with ``k = damping`` (eq. 36–38)."""
  q_damping, g_damping = factored_damping(q, g, damping, q_dim=q_dim, g_dim=g_dim)
  eye = lambda m: jnp.eye(m.shape[0], dtype=m.dtype)
  return (spd_inverse(q + q_damping.astype(q.dtype) * eye(q)),
          spd_inverse(g + g_damping.astype(g.dtype) * eye(g)))


def damped_kron_inverse(q: Array, g: Array, v: Array, q_damping: Array,
                        g_damping: Array) -> Array:
  """``(Q + q_damping I)⁻¹ V (𝒢 + g_damping I)⁻¹`` for ``V`` of shape ``(dim Q, dim 𝒢)``.

  In vectorised form: ``((Q + q_damping I) ⊗ (𝒢 + g_damping I))⁻¹ vec(V)`` with
  row-major ``vec``.
  """
  eye = lambda m: jnp.eye(m.shape[0], dtype=m.dtype)
  return spd_inverse(q + q_damping * eye(q)) @ v @ spd_inverse(g + g_damping * eye(g))


def factored_inverse(q: Array, g: Array, v: Array, damping: Array, *, q_dim: int,
                     g_dim: int) -> Array:
  """``(Q̃ + ω√k I)⁻¹ V (𝒢̃ + ω⁻¹√k I)⁻¹`` with ω from the factors' traces (eq. 36–38)."""
  q_inv, g_inv = damped_inverses(q, g, damping, q_dim=q_dim, g_dim=g_dim)
  return q_inv @ v @ g_inv
