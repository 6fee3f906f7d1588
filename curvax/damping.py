"""Damping rules shared by the Kronecker-factored solvers (kfra_kflr.md App. C).

* :func:`factored_tikhonov` — the factored damping ``(Q + ω√k I) ⊗ (𝒢 + ω⁻¹√k I)`` of
  eq. 36 with the trace-norm ``ω`` of eq. 38;
* :func:`tau_rule` — the Levenberg-Marquardt rule for ``τ`` (App. C.3.1), the
  ``lower = upper = 0.75`` case of :func:`curvax.quadratic.levenberg_marquardt`;
* :func:`gamma_candidates` — ``{ω_γ γ, γ, γ/ω_γ}`` of the greedy γ rule (App. C.3.2),
  and :func:`best_candidate` — the one whose step has the lowest finite model value;
* :func:`period_factor` — ``0.95^T``, the paper's ``ω_τ`` and ``ω_γ``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from curvax import quadratic

Array = jax.Array

_TINY = 1e-30


def factored_tikhonov(q_trace: Array, q_dim: int, g_trace: Array, g_dim: int,
                      damping: Array) -> tuple[Array, Array]:
  """``(ω√k, ω⁻¹√k)``: the damping added to each Kronecker factor (eq. 36–38).

  ``ω = √((Tr Q / dim Q) / (Tr 𝒢 / dim 𝒢))`` balances the two factors' mean eigenvalues
  (Algorithm 1 writes it ``√(Tr Q · dim 𝒢 / (Tr 𝒢 · dim Q))``); ``k = γ + η``. A factor
  with zero trace (an all-zero layer) is treated as having a tiny one, so ``ω`` stays
  finite.
  """
  q_mean = jnp.maximum(q_trace / q_dim, _TINY)
  g_mean = jnp.maximum(g_trace / g_dim, _TINY)
  omega = jnp.sqrt(q_mean / g_mean)
  root = jnp.sqrt(damping)
  return omega * root, root / omega


def tau_rule(tau: Array, ratio: Array, *, factor: Array, min_tau: float = 0.0,
             max_tau: float = jnp.inf) -> Array:
  """``τ·ω_τ`` if ``ρ > 0.75``, ``τ/ω_τ`` if ``ρ < 0.75`` (App. C.3.1, ``ω_τ < 1``)."""
  return quadratic.levenberg_marquardt(tau, ratio, factor=factor, lower=0.75, upper=0.75,
                                       min_damping=min_tau, max_damping=max_tau)


def gamma_candidates(gamma: Array, factor: Array, *, min_gamma: float = 0.0,
                     max_gamma: float = jnp.inf) -> Array:
  """``[ω_γ γ, γ, γ/ω_γ]`` clipped to the bounds (App. C.3.2, ``ω_γ < 1``)."""
  return jnp.clip(jnp.stack([gamma * factor, gamma, gamma / factor]), min_gamma, max_gamma)


def best_candidate(values: Array) -> Array:
  """Index of the lowest finite value (App. C.3.2's greedy choice).

  A candidate whose inverse failed (not positive definite at the smallest γ in low
  precision) has a NaN model value, which a plain ``argmin`` would pick: its batch would
  be skipped with the count unchanged, so the same choice would fail on every later
  batch. If no value is finite the first index is returned (and the step is skipped).
  """
  return jnp.argmin(jnp.where(jnp.isfinite(values), values, jnp.inf))


def period_factor(period, base: float = 0.95):
  """``base^period``: the paper's ``ω_τ = 0.95^{T_τ}`` and ``ω_γ = 0.95^{T_γ}`` (a
  period of 0, a disabled rule, counts as 1). A Python float for a Python or NumPy
  period, an array for a JAX one (e.g. injected by ``optax.inject_hyperparams``)."""
  if isinstance(period, jax.Array):
    return base ** jnp.maximum(period, 1).astype(jnp.result_type(float))
  return base ** max(int(period), 1)
