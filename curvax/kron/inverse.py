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

XLA unrolls that recursion, so compiling it once per factor was a large share of a KFAC
step's compile time. :func:`spd_inverses` instead pads every factor larger than a block
with an identity block to a multiple of 64 rows (``[[M, 0], [0, I]]⁻¹ = [[M⁻¹, 0],
[0, I]]``, exact) and inverts the factors of one padded size in one ``lax.map``: the
recursion is compiled once per padded size. Measured side by side on the autoencoder's 16
factors (14 above a block, four padded sizes): the inverse set compiles in 3.6 s instead
of 7.0 s and runs 16 % slower (116 vs 100 ms, once per inverse refresh); the KFAC step's
XLA compile went from 16.2 s to 12.4 s (HLO ops 15.6k → 11.3k).
"""

from __future__ import annotations

import collections
from typing import Sequence

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
  (``_inverse_cholesky_factor``, then ``L⁻ᵀL⁻¹`` as ``lauum``). A Cholesky solve
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


_PAD_MULTIPLE = 64


def spd_inverses(matrices: Sequence[Array]) -> list[Array]:
  """``[M⁻¹ for M in matrices]`` for symmetric positive-definite matrices, compiled once
  per padded size on CPU (see the module docstring); a Cholesky solve each elsewhere."""
  matrices = list(matrices)
  if all(m.shape[0] <= _CHOLESKY_BLOCK for m in matrices):
    return [cholesky_inverse(m) for m in matrices]
  return jax.lax.platform_dependent(
      *matrices, cpu=lambda *ms: _padded_group_inverses(ms),
      default=lambda *ms: [cholesky_inverse(m) for m in ms])


def _padded_group_inverses(matrices: Sequence[Array]) -> list[Array]:
  inverses: list = [None] * len(matrices)
  groups = collections.defaultdict(list)
  for i, m in enumerate(matrices):
    n = m.shape[0]
    if n <= _CHOLESKY_BLOCK:
      inverses[i] = cholesky_inverse(m)
    else:
      groups[-(-n // _PAD_MULTIPLE) * _PAD_MULTIPLE, m.dtype].append(i)
  for (size, dtype), members in groups.items():
    padded = jnp.stack([_pad_with_identity(matrices[i], size) for i in members])
    # lax.map, not vmap: batched LAPACK calls of two such groups in one program hung
    # (jax 0.10.2, CPU), and a loop compiles the recursion once all the same.
    group_inverses = jax.lax.map(blocked_spd_inverse, padded)
    for j, i in enumerate(members):
      n = matrices[i].shape[0]
      inverses[i] = group_inverses[j, :n, :n]
  return inverses


def _pad_with_identity(matrix: Array, size: int) -> Array:
  """``[[M, 0], [0, I]]`` of ``size`` rows."""
  pad = size - matrix.shape[0]
  if not pad:
    return matrix
  ones = jnp.concatenate([jnp.zeros(matrix.shape[0], matrix.dtype),
                          jnp.ones(pad, matrix.dtype)])
  return jnp.pad(matrix, ((0, pad), (0, pad))) + jnp.diag(ones)


def factored_damping(q: Array, g: Array, damping: Array, *, q_dim: int,
                     g_dim: int) -> tuple[Array, Array]:
  """``(ω√k, ω⁻¹√k)`` for the factors ``Q̃`` and ``𝒢̃`` (eq. 36–38).

  ``q_dim``/``g_dim`` are the factors' true sizes (a reserved but unused bias slot of
  ``Q̃`` is not counted). A vector ``q`` is a diagonal factor.
  """
  return damping_lib.factored_tikhonov(_trace(q), q_dim, _trace(g), g_dim, damping)


def _trace(factor: Array) -> Array:
  return jnp.sum(factor) if factor.ndim == 1 else jnp.trace(factor)


def damped_factors(q: Array, g: Array, damping: Array, *, q_dim: int,
                   g_dim: int) -> tuple[Array, Array]:
  """``(Q̃ + ω√k I, 𝒢̃ + ω⁻¹√k I)`` with ``k = damping`` (eq. 36–38); a diagonal ``Q̃``
  (a vector: an embedding's) stays a vector."""
  q_damping, g_damping = factored_damping(q, g, damping, q_dim=q_dim, g_dim=g_dim)
  q_damped = (q + jnp.asarray(q_damping, q.dtype) if q.ndim == 1
              else add_to_diagonal(q, q_damping))
  return q_damped, add_to_diagonal(g, g_damping)


def damped_inverses(q: Array, g: Array, damping: Array, *, q_dim: int,
                    g_dim: int) -> tuple[Array, Array]:
  """``((Q̃ + ω√k I)⁻¹, (𝒢̃ + ω⁻¹√k I)⁻¹)`` with ``k = damping`` (eq. 36–38); a
  diagonal ``Q̃`` (a vector: an embedding's) gets a vector inverse."""
  q_damped, g_damped = damped_factors(q, g, damping, q_dim=q_dim, g_dim=g_dim)
  if q_damped.ndim == 1:
    return 1 / q_damped, spd_inverse(g_damped)
  q_inverse, g_inverse = spd_inverses([q_damped, g_damped])
  return q_inverse, g_inverse


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
