"""Damped Kronecker inverses (kfra_kflr.md App. C.1).

The damped block ``Q̃ ⊗ 𝒢̃ + kI`` (eq. 35) is replaced by the factored Tikhonov damping

    (Q̃ + ω√k I) ⊗ (𝒢̃ + ω⁻¹√k I),   ω = √( (Tr Q̃ / dim Q̃) / (Tr 𝒢̃ / dim 𝒢̃) )   (eq. 36–38)

(trace norm), whose inverse applied to a gradient ``V`` (kernel as ``(in, out)``, bias as
an appended row, row-major ``vec``) is ``(Q̃ + ω√k I)⁻¹ V (𝒢̃ + ω⁻¹√k I)⁻¹`` — the identity
``(A ⊗ B)⁻¹ vec(V) = vec(A⁻¹ V B⁻¹)`` for symmetric ``A, B`` in this layout. As the
paper notes, this needs two positive-definite solves per layer (Cholesky here) instead
of the eigendecompositions the exact damped inverse would need.

On CPU the Cholesky factorisation of a large factor and the inverse built from it are
blocked recursions (:func:`blocked_spd_inverse`, as LAPACK ``potrf`` + ``potri``): most
of the work becomes matrix products, which XLA runs on all cores, instead of LAPACK
factorisations and triangular solves against the identity (one core, and erratic when
OpenBLAS threads compete with XLA's); the result stays row-major, so the stored inverses
are never transposed. Other platforms use a Cholesky solve.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from curvax import damping as damping_lib

Array = jax.Array


_CHOLESKY_BLOCK = 128


def cholesky_inverse(matrix: Array) -> Array:
  """``M⁻¹`` of a symmetric positive-definite ``M`` from its Cholesky factor.

  LAPACK works on column-major arrays; for a symmetric ``M`` (and ``M⁻¹``) the
  transposes below turn that layout into a relabelling of the row-major arrays instead
  of a copy (and keep XLA from asking for the whole stored factor in column-major order).
  """
  factor = jsl.cho_factor(matrix.T, lower=True)
  return jsl.cho_solve(factor, jnp.eye(matrix.shape[0], dtype=matrix.dtype)).T


def _split(n: int) -> int:
  return min(n - 1, -(-n // 128) * 64)  # about half, a multiple of 64


def _inverse_cholesky_factor(matrix: Array, block: int) -> Array:
  """``L⁻¹`` for the Cholesky factor ``L`` of a symmetric positive-definite matrix, by
  the 2×2 block recursion of a right-looking Cholesky factorisation carried along with
  ``trtri``'s (``L`` itself is never assembled)::

      L₁₁ = chol(A₁₁),  L₂₁ = A₂₁ L₁₁⁻ᵀ,  L₂₂ = chol(A₂₂ − L₂₁ L₂₁ᵀ),
      L⁻¹ = [[L₁₁⁻¹, 0], [−L₂₂⁻¹ L₂₁ L₁₁⁻¹, L₂₂⁻¹]].

  The Schur complement is the factorisation's own trailing update (not ``C − BᵀA⁻¹B``
  with an explicit inverse), and every product is a matrix multiplication that XLA runs
  on all cores; LAPACK (one core) only factorises and inverts blocks of at most
  ``block`` rows.
  """
  n = matrix.shape[0]
  if n <= block:
    # ``matrix`` is symmetric; factorising its transpose lets LAPACK's column-major
    # layout be a relabelling of the row-major array rather than a copy.
    lower = jax.lax.linalg.cholesky(matrix.T, symmetrize_input=False)
    return jax.lax.linalg.triangular_solve(lower, jnp.eye(n, dtype=lower.dtype),
                                           left_side=True, lower=True)
  k = _split(n)
  y11 = _inverse_cholesky_factor(matrix[:k, :k], block)
  l21 = matrix[k:, :k] @ y11.T
  y22 = _inverse_cholesky_factor(matrix[k:, k:] - l21 @ l21.T, block)
  y21 = -(y22 @ (l21 @ y11))
  return jnp.concatenate([jnp.concatenate([y11, jnp.zeros((k, n - k), y11.dtype)], axis=1),
                          jnp.concatenate([y21, y22], axis=1)], axis=0)


def _lower_gram(y: Array, block: int) -> Array:
  """``YᵀY`` for a lower-triangular ``Y`` (LAPACK ``lauum``'s recursion), skipping the
  zero block."""
  n = y.shape[0]
  if n <= block:
    return y.T @ y
  k = _split(n)
  y11, y21, y22 = y[:k, :k], y[k:, :k], y[k:, k:]
  upper_left = _lower_gram(y11, block) + y21.T @ y21
  upper_right = y21.T @ y22
  return jnp.concatenate([jnp.concatenate([upper_left, upper_right], axis=1),
                          jnp.concatenate([upper_right.T, _lower_gram(y22, block)], axis=1)],
                         axis=0)


def blocked_spd_inverse(matrix: Array, *, block: int = _CHOLESKY_BLOCK) -> Array:
  """``M⁻¹ = L⁻ᵀL⁻¹`` of a symmetric positive-definite ``M = LLᵀ``, as LAPACK
  ``potrf`` + ``potri``, by 2×2 block recursions whose work (``≈ n³`` flops) is matrix
  products, down to LAPACK on blocks of at most ``block`` rows
  (:func:`_inverse_cholesky_factor`, then ``L⁻ᵀL⁻¹`` as ``lauum``). A Cholesky solve
  against the identity instead spends ``2n³`` flops in single-core LAPACK triangular
  solves after a single-core factorisation. The rounding is that of a blocked Cholesky
  factorisation; an inverse built on explicit Schur complements ``C − BᵀA⁻¹B`` loses
  accuracy with ``κ(A)`` and fails on the nearly singular factors of wide layers at small
  damping. A matrix that is not positive definite gives non-finite entries.
  """
  n = matrix.shape[0]
  if n <= block:
    return cholesky_inverse(matrix)
  return _lower_gram(_inverse_cholesky_factor(matrix, block), block)


def spd_inverse(matrix: Array) -> Array:
  """``M⁻¹`` of a symmetric positive-definite matrix.

  Cholesky factor and blocked recursions on CPU (:func:`blocked_spd_inverse`), a
  Cholesky solve elsewhere. ``M`` is not symmetrised first (the Kronecker factors are
  symmetric by construction, and the Cholesky factorisation reads one triangle): a
  transpose here would make XLA copy every stored factor into a transposed layout on
  every step, for a branch that runs only on inverse-refresh steps.
  """
  if matrix.shape[0] <= _CHOLESKY_BLOCK:
    return cholesky_inverse(matrix)
  return jax.lax.platform_dependent(matrix, cpu=blocked_spd_inverse,
                                    default=cholesky_inverse)


def factored_damping(q: Array, g: Array, damping: Array, *, q_dim: int,
                     g_dim: int) -> tuple[Array, Array]:
  """``(ω√k, ω⁻¹√k)`` for the factors ``Q̃`` and ``𝒢̃`` (eq. 36–38).

  ``q_dim``/``g_dim`` are the factors' true sizes (a reserved but unused bias slot of
  ``Q̃`` is not counted). A vector ``q`` is a diagonal factor.
  """
  return damping_lib.factored_tikhonov(_trace(q), q_dim, _trace(g), g_dim, damping)


def _trace(factor: Array) -> Array:
  return jnp.sum(factor) if factor.ndim == 1 else jnp.trace(factor)


def damped_inverses(q: Array, g: Array, damping: Array, *, q_dim: int,
                    g_dim: int) -> tuple[Array, Array]:
  """``((Q̃ + ω√k I)⁻¹, (𝒢̃ + ω⁻¹√k I)⁻¹)`` with ``k = damping`` (eq. 36–38); a
  diagonal ``Q̃`` (a vector: an embedding's) gets a vector inverse."""
  q_damping, g_damping = factored_damping(q, g, damping, q_dim=q_dim, g_dim=g_dim)
  q_inverse = (1 / (q + jnp.asarray(q_damping, q.dtype)) if q.ndim == 1
               else spd_inverse(add_to_diagonal(q, q_damping)))
  return (q_inverse,
          spd_inverse(add_to_diagonal(g, g_damping)))


def add_to_diagonal(matrix: Array, value: Array) -> Array:
  """``M + value·I`` in ``M``'s dtype."""
  return matrix + jnp.asarray(value, matrix.dtype) * jnp.eye(matrix.shape[0],
                                                             dtype=matrix.dtype)


def damped_kron_inverse(q: Array, g: Array, v: Array, q_damping: Array,
                        g_damping: Array) -> Array:
  """``(Q + q_damping I)⁻¹ V (𝒢 + g_damping I)⁻¹`` for ``V`` of shape ``(dim Q, dim 𝒢)``.

  In vectorised form: ``((Q + q_damping I) ⊗ (𝒢 + g_damping I))⁻¹ vec(V)`` with
  row-major ``vec``.
  """
  return (spd_inverse(add_to_diagonal(q, q_damping)) @ v
          @ spd_inverse(add_to_diagonal(g, g_damping)))


def factored_inverse(q: Array, g: Array, v: Array, damping: Array, *, q_dim: int,
                     g_dim: int) -> Array:
  """``(Q̃ + ω√k I)⁻¹ V (𝒢̃ + ω⁻¹√k I)⁻¹`` with ω from the factors' traces (eq. 36–38)."""
  q_inv, g_inv = damped_inverses(q, g, damping, q_dim=q_dim, g_dim=g_dim)
  return q_inv @ v @ g_inv
