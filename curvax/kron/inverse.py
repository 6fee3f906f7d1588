"""Damped Kronecker inverses (kfra_kflr.md App. C.1).

The damped block ``Q̃ ⊗ 𝒢̃ + kI`` (eq. 35) is replaced by the factored Tikhonov damping

    (Q̃ + ω√k I) ⊗ (𝒢̃ + ω⁻¹√k I),   ω = √( (Tr Q̃ / dim Q̃) / (Tr 𝒢̃ / dim 𝒢̃) )   (eq. 36–38)

(trace norm), whose inverse applied to a gradient ``V`` (kernel as ``(in, out)``, bias as
an appended row, row-major ``vec``) is ``(Q̃ + ω√k I)⁻¹ V (𝒢̃ + ω⁻¹√k I)⁻¹`` — the identity
``(A ⊗ B)⁻¹ vec(V) = vec(A⁻¹ V B⁻¹)`` for symmetric ``A, B`` in this layout.

Factors are kept as eigendecompositions ``Q̃ = U_Q diag(s_Q) U_Qᵀ``: recomputed every few
steps, they serve any damping ``k`` at the cost of four matrix products, so the greedy
γ rule (App. C.3.2) can try three values of ``γ`` without three inversions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvax import damping as damping_lib

Array = jax.Array


class Eigen(NamedTuple):
  """``M = vecs diag(vals) vecsᵀ`` with ``vals ≥ 0``."""
  vecs: Array
  vals: Array


def eigh(matrix: Array) -> Eigen:
  """Eigendecomposition of a symmetric PSD factor; rounding negatives clipped to 0."""
  vals, vecs = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
  return Eigen(vecs, jnp.maximum(vals, 0.0))


def damped_kron_inverse(q: Eigen, g: Eigen, v: Array, q_damping: Array,
                        g_damping: Array) -> Array:
  """``(Q + q_damping I)⁻¹ V (𝒢 + g_damping I)⁻¹`` for ``V`` of shape ``(dim Q, dim 𝒢)``.

  In vectorised form: ``((Q + q_damping I) ⊗ (𝒢 + g_damping I))⁻¹ vec(V)`` with
  row-major ``vec``.
  """
  rotated = q.vecs.T @ v @ g.vecs
  scale = (q.vals + q_damping)[:, None] * (g.vals + g_damping)[None, :]
  return q.vecs @ (rotated / scale) @ g.vecs.T


def factored_inverse(q: Eigen, g: Eigen, v: Array, damping: Array, *, q_dim: int,
                     g_dim: int) -> Array:
  """``(Q̃ + ω√k I)⁻¹ V (𝒢̃ + ω⁻¹√k I)⁻¹`` with ω from the factors' traces (eq. 36–38).

  ``q_dim``/``g_dim`` are the factors' true sizes (a reserved but unused bias slot of
  ``Q̃`` is not counted).
  """
  q_damping, g_damping = damping_lib.factored_tikhonov(
      jnp.sum(q.vals), q_dim, jnp.sum(g.vals), g_dim, damping)
  return damped_kron_inverse(q, g, v, q_damping, g_damping)
