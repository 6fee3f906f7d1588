"""EKFAC: the Kronecker factors' eigenbasis with its diagonal re-estimated (George et al.
2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis").

KFAC's block ``Q̃ ⊗ 𝒢̃ = (U_Q ⊗ U_𝒢) diag(s_Q ⊗ s_𝒢) (U_Q ⊗ U_𝒢)ᵀ`` keeps the eigenbasis
of the Kronecker product but its eigenvalues ``s_Q ⊗ s_𝒢`` are only the products of the
factors'. EKFAC keeps the basis (``eigh`` of the averaged factors every
``inverse_period`` steps, :mod:`curvax.kron.eigen`) and replaces the eigenvalues by the
curvature's own second moments in that basis,

    S = Σ_n Σ_k (U_Qᵀ G_{n,k} U_𝒢)²,     G_{n,k} = Σ_t a_{n,t} c_{k,n,t}ᵀ,

the per-example gradient ``G_{n,k}`` of column ``k`` (one sampled output for the
Monte-Carlo Fisher, one column of ``H_L``'s square root for the exact GGN; ``t`` the
positions an example shares the kernel over: sequence positions, convolution patches)
rotated into the basis and squared — the diagonal of the block's curvature
``Σ_{n,k} vec(G_{n,k}) vec(G_{n,k})ᵀ`` in that basis, which is the best diagonal there
in Frobenius norm (their §3.2). ``S`` is a moving average (``factor_decay``) updated on
every factor update, in the basis current after that step's refresh; on the first
step the basis and ``S`` both come from that batch. The damping is exact: the
preconditioned block is ``U_Q [(U_Qᵀ V U_𝒢) / (S + k)] U_𝒢ᵀ`` with ``k = γ + η``.

Following the authors' code (github.com/Thrandis/EKFAC-pytorch, ``ekfac.py``): the
per-example gradient sums a convolution's positions before squaring, and the average of
``S`` runs on across basis refreshes (their ``ra`` mode). Departures: the basis is
refreshed only on factor-update steps (``inverse_period`` counts steps; theirs
refreshes on statistics steps too); the bias is the kernel's extra input row (a joint
block, as :mod:`curvax.kron` has it); an embedding's block keeps ``s_Q ⊗ s_𝒢`` (its
one-hot inputs are never materialised); normalisation layers' and lone vectors' full
blocks are already exact and use their own eigenvalues; the α/μ model and the γ/τ
rules of :func:`curvax.kfac` set the step (the authors use a fixed learning rate).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from curvax.kron import eigen
from curvax.kron import state as kron_state
from curvax.kron.capture import Capture
from curvax.kron.factors import Estimate

Array = jax.Array


class Corrected(NamedTuple):
  """The eigenbases and, per parameter leaf with a dense ``Q̃`` slot, the re-estimated
  diagonal ``S`` of shape ``(q_slot, out)`` (``None`` elsewhere)."""
  basis: eigen.Eigenbasis
  scales: tuple


def init(params, *, max_factor_dim: Optional[int] = None):
  """Zero factors, identity eigenbases and zero scales."""
  factors, basis = eigen.init(params, max_factor_dim=max_factor_dim)
  scales = tuple(None if q is None or q.ndim == 1
                 else jnp.zeros((q.shape[0], g.shape[0]), q.dtype)
                 for q, g in zip(factors.q, factors.g))
  return factors, Corrected(basis, scales)


def refresh(factors: kron_state.Factors, previous: Corrected, capture: Capture,
            damping: Array = None) -> Corrected:
  """Fresh eigenbases (the scales are re-estimated by :func:`correct`)."""
  return previous._replace(basis=eigen.decompose(factors, previous.basis, capture, damping))


def example_scales(q_vectors: Array, g_vectors: Array, a: Array, c: Array) -> Array:
  """``Σ_n Σ_k (U_Qᵀ G_{n,k} U_𝒢)²`` with ``G_{n,k} = Σ_t a_{n,t} c_{k,n,t}ᵀ``.

  ``a``: ``(B, T, q)`` with ``q`` at most ``U_Q``'s size (zero-padded to it: a layer
  without bias); ``c``: ``(K, B, T, out)``. With one position (``T = 1``) the rotated
  gradient is an outer product and ``S = Σ_n (ã_n²)ᵀ (Σ_k c̃_{k,n}²)`` is one matmul;
  otherwise the examples are summed one at a time (``K·q·out`` memory each).
  """
  pad = q_vectors.shape[0] - a.shape[-1]
  if pad:
    a = jnp.pad(a, ((0, 0), (0, 0), (0, pad)))
  a_rot = a.astype(q_vectors.dtype) @ q_vectors
  c_rot = c.astype(g_vectors.dtype) @ g_vectors
  if a.shape[1] == 1:
    return jnp.square(a_rot[:, 0]).T @ jnp.sum(jnp.square(c_rot[:, :, 0]), axis=0)

  def add_example(n, total):
    grads = jnp.einsum("tq,kto->kqo", a_rot[n], c_rot[:, n])
    return total + jnp.sum(jnp.square(grads), axis=0)

  zero = jnp.zeros((q_vectors.shape[0], g_vectors.shape[0]), q_vectors.dtype)
  return jax.lax.fori_loop(0, a.shape[0], add_example, zero)


def correct(rep: Corrected, capture: Capture, estimate: Estimate, *, decay, first: Array,
            accept: Array, fraction: float = 1.0) -> Corrected:
  """``S ← decay·S + (1 − decay)·Ŝ`` for this batch's ``Ŝ`` in the current basis (``Ŝ``
  alone on the first step; unchanged where ``accept`` is false: a non-finite batch).

  With ``fraction < 1``, ``Ŝ`` sums the leading ``⌈fraction·B⌉`` of the ``B`` examples
  (per device) and scales by ``B / m``: an unbiased estimate at that fraction of the
  rotation's cost (the examples' order is the batch's, already random)."""
  if not estimate.examples:
    raise ValueError("curvax.ekfac: the estimator gave no per-example rows "
                     "(kron.kfac_factors / kflr_factors with examples=True).")
  weight = jnp.where(first, 0.0, decay)
  scales = list(rep.scales)
  for block, rows in zip(capture.blocks, estimate.examples):
    if rows is None:
      continue
    i = block.kernel
    a, c = rows
    batch = a.shape[0]
    kept = min(batch, max(1, math.ceil(fraction * batch)))
    fresh = capture.lin.batch_mean(example_scales(
        rep.basis.q_vectors[i], rep.basis.g_vectors[i], a[:kept], c[:, :kept]))
    if kept < batch:
      fresh = fresh * (batch / kept)
    mixed = weight * scales[i] + (1 - weight) * fresh.astype(scales[i].dtype)
    scales[i] = jnp.where(accept, mixed, scales[i]).astype(scales[i].dtype)
  return rep._replace(scales=tuple(scales))


def preconditioner(factored: bool):
  """EKFAC's ``precondition`` (a :class:`curvax.kron.stages.Representation` field): per
  block ``U_Q [(U_Qᵀ V U_𝒢) / (S + d)] U_𝒢ᵀ`` with ``d = k`` (exact damping) or, with
  ``factored``, ``d = s_Q ω⁻¹√k + ω√k s_𝒢 + k`` — what KFAC's factored damping (eq.
  36–38) adds to ``s_Q ⊗ s_𝒢`` (:func:`curvax.kron.eigen.damping_terms`); an embedding's
  block with ``s_Q s_𝒢ᵀ + d``; per full block ``U [(Uᵀ v) / (s + k)]``; fallback leaves as
  :func:`curvax.kron.state.apply_blocks`."""

  def precondition(capture: Capture, grad, factors: kron_state.Factors, rep: Corrected,
                   damping: Array, *, fallback: str = "diagonal"):
    basis = rep.basis

    def block_solve(block, v):
      i = block.kernel
      scales = rep.scales[i]
      if scales is None:
        scales = basis.q_values[i][:, None] * basis.g_values[i][None, :]
      denominator = scales + eigen.damping_terms(
          basis, i, damping, q_dim=block.q_dim, g_dim=block.out_dim,
          exact=not factored).astype(scales.dtype)
      return eigen.precondition_block(basis, i, v.astype(denominator.dtype), denominator)

    return kron_state.apply_blocks(capture, grad, factors, damping, block_solve,
                                   eigen.full_solver(basis, damping), fallback=fallback)

  return precondition
