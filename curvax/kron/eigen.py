"""The Kronecker factors in their eigenbases: damping without re-decomposition.

``Q̃ = U_Q diag(s_Q) U_Qᵀ`` and ``𝒢̃ = U_𝒢 diag(s_𝒢) U_𝒢ᵀ`` (``eigh`` every
``inverse_period`` steps) make ``Q̃ ⊗ 𝒢̃ = (U_Q ⊗ U_𝒢) diag(s_Q ⊗ s_𝒢) (U_Q ⊗ U_𝒢)ᵀ``, so
any damping of the block is a division in the eigenbasis. For a gradient block ``V``
(kernel as ``(in, out)``, bias as an appended row) the preconditioned block is

    U_Q [ (U_Qᵀ V U_𝒢) / D ] U_𝒢ᵀ,

with, for ``k = γ + η``,

* ``D = (s_Q + ω√k) (s_𝒢 + ω⁻¹√k)ᵀ`` — the factored Tikhonov damping of eq. 36–38,
  the same preconditioner as the Cholesky inverses of :mod:`curvax.kron.inverse`
  (``ω`` from the factors' traces, the sums of their eigenvalues); or
* ``D = s_Q s_𝒢ᵀ + k`` — the exact Tikhonov damping ``(Q̃ ⊗ 𝒢̃ + kI)⁻¹`` of eq. 35,
  which the paper avoids precisely because it needs these eigendecompositions (App. C.1).

Either way the decomposition does not depend on ``k``: the γ rule's three candidates
(App. C.3.2) reuse one decomposition where the Cholesky representation inverts every
factor once per candidate. A full block (a LayerNorm's scale and offset) is
``U diag(s) Uᵀ`` and gets ``U [(Uᵀ v) / (s + k)]``; an embedding's diagonal ``Q̃`` is its
own eigenbasis. Eigenvalues are clipped at 0 (the factors are PSD; rounding can make the
smallest slightly negative).

Like kfac-jax's ``use_exact_inverses``, and unlike its default, this decomposes the
factors rather than inverting them; unlike kfac-jax the eigenvalues are stored, not the
damped inverses, so a change of damping costs no decomposition.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from curvax import damping as damping_lib
from curvax.kron import state as kron_state
from curvax.kron.capture import Capture

Array = jax.Array


class Eigenbasis(NamedTuple):
  """Per parameter leaf, ``(vectors, values)`` of ``Q̃``, ``𝒢̃`` and the full blocks
  (``None`` where the state reserves no such slot; ``q_vectors`` is also ``None`` for an
  embedding's diagonal ``Q̃``)."""
  q_vectors: tuple
  q_values: tuple
  g_vectors: tuple
  g_values: tuple
  full_vectors: tuple
  full_values: tuple


def init(params, *, max_factor_dim: Optional[int] = None):
  """Zero factors, and their eigenbases: identity vectors, zero eigenvalues."""
  factors, _ = kron_state.init(params, max_factor_dim=max_factor_dim)

  def basis(matrices):
    vectors = tuple(None if m is None or m.ndim == 1 else jnp.eye(m.shape[0], dtype=m.dtype)
                    for m in matrices)
    values = tuple(None if m is None else jnp.zeros(m.shape[:1], m.dtype)
                   for m in matrices)
    return vectors, values

  return factors, Eigenbasis(*basis(factors.q), *basis(factors.g), *basis(factors.full))


def _decompose(matrix: Array) -> tuple[Array, Array]:
  values, vectors = jnp.linalg.eigh(matrix)
  return vectors, jnp.maximum(values, 0)


def decompose(factors: kron_state.Factors, previous: Eigenbasis, capture: Capture,
              damping: Array = None) -> Eigenbasis:
  """Fresh eigenbases of the captured blocks' factors (other slots keep ``previous``).
  ``damping`` is not read: the decomposition serves every damping."""
  del damping
  fields = {name: list(value) for name, value in previous._asdict().items()}

  def put(prefix, i, matrix):
    if matrix.ndim == 1:  # a diagonal factor is its own eigenbasis
      fields[f"{prefix}_values"][i] = jnp.maximum(matrix, 0)
      return
    fields[f"{prefix}_vectors"][i], fields[f"{prefix}_values"][i] = _decompose(matrix)

  for block in capture.blocks:
    put("q", block.kernel, factors.q[block.kernel])
    put("g", block.kernel, factors.g[block.kernel])
  for block in capture.full_blocks:
    put("full", block.owner, factors.full[block.owner])
  return Eigenbasis(**{name: tuple(value) for name, value in fields.items()})


def _rotate(vectors: Optional[Array], matrix: Array, *, left: bool, inverse: bool):
  """``Uᵀ M`` / ``U M`` (``left``) or ``M U`` / ``M Uᵀ``; the identity for ``None``."""
  if vectors is None:
    return matrix
  if left:
    return (vectors @ matrix) if inverse else (vectors.T @ matrix)
  return (matrix @ vectors.T) if inverse else (matrix @ vectors)


def damping_terms(basis: Eigenbasis, i: int, damping: Array, *, q_dim: int, g_dim: int,
                  exact: bool) -> Array:
  """``D − s_Q s_𝒢ᵀ``: what the damping adds to the block's eigenvalues — ``k``, or for
  the factored form ``s_Q ω⁻¹√k + ω√k s_𝒢 + k`` (the expanded product)."""
  s_q, s_g = basis.q_values[i], basis.g_values[i]
  k = jnp.asarray(damping, s_q.dtype)
  if exact:
    return jnp.broadcast_to(k, (s_q.shape[0], s_g.shape[0]))
  q_damping, g_damping = damping_lib.factored_tikhonov(
      jnp.sum(s_q), q_dim, jnp.sum(s_g), g_dim, k)
  return (s_q[:, None] * g_damping + q_damping * s_g[None, :]) + q_damping * g_damping


def block_denominator(basis: Eigenbasis, i: int, damping: Array, *, q_dim: int,
                      g_dim: int, exact: bool) -> Array:
  """``D`` of the module docstring for the block whose kernel is leaf ``i``."""
  s_q, s_g = basis.q_values[i], basis.g_values[i]
  k = jnp.asarray(damping, s_q.dtype)
  if exact:
    return s_q[:, None] * s_g[None, :] + k
  q_damping, g_damping = damping_lib.factored_tikhonov(
      jnp.sum(s_q), q_dim, jnp.sum(s_g), g_dim, k)
  return (s_q + q_damping)[:, None] * (s_g + g_damping)[None, :]


def precondition_block(basis: Eigenbasis, i: int, v: Array, denominator: Array) -> Array:
  """``U_Q [(U_Qᵀ V U_𝒢) / D] U_𝒢ᵀ`` for block ``i``'s gradient ``V``."""
  q_vectors, g_vectors = basis.q_vectors[i], basis.g_vectors[i]
  rotated = _rotate(q_vectors, _rotate(g_vectors, v, left=False, inverse=False),
                    left=True, inverse=False)
  scaled = rotated / denominator
  return _rotate(q_vectors, _rotate(g_vectors, scaled, left=False, inverse=True),
                 left=True, inverse=True)


def full_solver(basis: Eigenbasis, damping: Array):
  """``(owner, v) -> U [(Uᵀ v) / (s + k)]`` for the full blocks."""

  def full_solve(owner, v):
    vectors, values = basis.full_vectors[owner], basis.full_values[owner]
    k = jnp.asarray(damping, values.dtype)
    return vectors @ ((vectors.T @ v.astype(values.dtype)) / (values + k))

  return full_solve


def preconditioner(exact: bool):
  """The ``precondition`` of a :class:`curvax.kron.stages.Representation` over an
  :class:`Eigenbasis`, with exact (eq. 35) or factored (eq. 36–38) damping."""

  def precondition(capture: Capture, grad, factors: kron_state.Factors,
                   basis: Eigenbasis, damping: Array, *, fallback: str = "diagonal"):
    def block_solve(block, v):
      i = block.kernel
      denominator = block_denominator(basis, i, damping, q_dim=block.q_dim,
                                      g_dim=block.out_dim, exact=exact)
      return precondition_block(basis, i, v.astype(denominator.dtype), denominator)

    return kron_state.apply_blocks(capture, grad, factors, damping, block_solve,
                                   full_solver(basis, damping), fallback=fallback)

  return precondition
