"""A limited-memory store of curvature pairs and the two quasi-Newton products on it.

Pairs ``(s_i, y_i)`` with ``y_i ≈ C s_i`` live in fixed-size arrays (``memory`` rows,
flattened parameters), oldest first; ``count`` says how many of the last rows are valid,
so the store is a fixed-shape pytree that jit and ``lax.cond`` carry unchanged.

* :func:`lbfgs_inverse_product` — the L-BFGS two-loop recursion (Nocedal & Wright,
  Alg. 7.4) with ``H₀ = (sᵀy / yᵀy) I`` from the newest pair: used by SQN.
* :func:`sr1_inverse_product` — the compact limited-memory SR1 inverse (Byrd, Nocedal &
  Schnabel 1994, eq. 5.2): ``H = H₀ + (S − H₀Y)(R + Rᵀ − D − YᵀH₀Y)⁻¹(S − H₀Y)ᵀ`` with
  ``R`` the upper triangle (diagonal ``D`` included) of ``SᵀY``, the middle matrix
  inverted on its well-conditioned eigenspace only: used by L-SR1.
* :func:`sr1_accepts` — the standard SR1 skipping rule
  ``|yᵀ(s − Hy)| ≥ r ‖y‖ ‖s − Hy‖``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PairStore(NamedTuple):
  """``memory`` pair slots; the last ``count`` rows are valid, oldest first."""
  s: jax.Array
  y: jax.Array
  count: jax.Array


def empty(memory: int, size: int, dtype) -> PairStore:
  # Separate buffers: a state donated to a jitted step may not alias one buffer twice.
  zeros = lambda: jnp.zeros((memory, size), dtype)
  return PairStore(zeros(), zeros(), jnp.zeros((), jnp.int32))


def push(store: PairStore, s: jax.Array, y: jax.Array, accept: jax.Array) -> PairStore:
  """Append ``(s, y)`` (dropping the oldest when full) if ``accept``."""
  memory = store.s.shape[0]
  appended = PairStore(jnp.concatenate([store.s[1:], s[None]]),
                       jnp.concatenate([store.y[1:], y[None]]),
                       jnp.minimum(store.count + 1, memory))
  return jax.tree.map(lambda new, old: jnp.where(accept, new, old), appended, store)


def _valid(store: PairStore) -> jax.Array:
  memory = store.s.shape[0]
  return jnp.arange(memory) >= memory - store.count


def initial_scale(store: PairStore) -> jax.Array:
  """``γ = sᵀy / yᵀy`` of the newest pair (1 when the store is empty)."""
  s, y = store.s[-1], store.y[-1]
  yy = jnp.vdot(y, y)
  return jnp.where((store.count > 0) & (yy > 0), jnp.vdot(s, y) / jnp.where(yy > 0, yy, 1),
                   1.0)


def lbfgs_inverse_product(store: PairStore, g: jax.Array) -> jax.Array:
  """``H g`` with ``H`` the L-BFGS inverse-Hessian approximation (two-loop recursion)."""
  valid = _valid(store)
  sy = jnp.sum(store.s * store.y, axis=1)
  rho = jnp.where(valid & (sy != 0), 1.0 / jnp.where(sy != 0, sy, 1.0), 0.0)

  def backward(q, i):  # newest to oldest
    alpha = rho[i] * jnp.vdot(store.s[i], q)
    return q - alpha * store.y[i], alpha

  order = jnp.arange(store.s.shape[0])[::-1]
  q, alphas = jax.lax.scan(backward, g, order)
  r = initial_scale(store) * q

  def forward(r, inputs):  # oldest to newest
    i, alpha = inputs
    beta = rho[i] * jnp.vdot(store.y[i], r)
    return r + (alpha - beta) * store.s[i], None

  r, _ = jax.lax.scan(forward, r, (order[::-1], alphas[::-1]))
  return r


def sr1_inverse_product(store: PairStore, g: jax.Array) -> jax.Array:
  """``H g`` with ``H`` the compact limited-memory SR1 inverse approximation.

  Invalid slots are masked out of the middle matrix ``M = R + Rᵀ − D − YᵀH₀Y`` (they
  get a diagonal entry there and zero columns elsewhere), so they contribute nothing.

  ``M`` is inverted on its well-conditioned eigenspace only: eigenvalues with
  ``|μ| ≤ √ε · scale`` (``scale`` the largest entry of ``|SᵀY|`` and ``|YᵀH₀Y|``,
  the terms ``M`` is a difference of) are dropped, i.e. an update
  the SR1 recursion would divide by ~0 is skipped instead of blowing up. This matters
  from the very first pair: with ``H₀ = γI``, ``γ = sᵀy / yᵀy`` of that pair,
  ``yᵀ(s − H₀y) = 0`` exactly, so a single pair carries no rank-one correction and
  ``H = γI`` (the Barzilai-Borwein scaling).
  """
  valid = _valid(store)
  gamma = initial_scale(store)
  s = jnp.where(valid[:, None], store.s, 0.0)
  y = jnp.where(valid[:, None], store.y, 0.0)
  w = s - gamma * y                          # columns of S − H₀Y
  sty = s @ y.T                              # (SᵀY)_ij = s_iᵀ y_j
  yhy = gamma * (y @ y.T)
  # Inverse form: the UPPER triangle R of SᵀY (the direct form's L + D with s ↔ y).
  middle = jnp.triu(sty) + jnp.triu(sty, 1).T - yhy
  mask = valid[:, None] & valid[None, :]
  middle = jnp.where(mask, middle, 0.0)
  # The size of the terms M is a difference of, so cancellation shows up as small.
  scale = jnp.maximum(jnp.max(jnp.abs(jnp.where(mask, sty, 0.0))),
                      jnp.max(jnp.abs(jnp.where(mask, yhy, 0.0))))
  scale = jnp.where(scale > 0, scale, 1.0)
  middle = middle + jnp.diag(jnp.where(valid, 0.0, scale))
  eigenvalues, eigenvectors = jnp.linalg.eigh(0.5 * (middle + middle.T))
  cutoff = jnp.sqrt(jnp.finfo(middle.dtype).eps) * scale
  kept = jnp.abs(eigenvalues) > cutoff
  inverse = jnp.where(kept, 1.0 / jnp.where(kept, eigenvalues, 1.0), 0.0)
  coefficients = eigenvectors @ (inverse * (eigenvectors.T @ jnp.where(valid, w @ g, 0.0)))
  return gamma * g + w.T @ coefficients


def sr1_accepts(store: PairStore, s: jax.Array, y: jax.Array,
                tolerance: float = 1e-8) -> jax.Array:
  """SR1 skipping rule on the inverse update: ``|yᵀ(s − Hy)| ≥ r ‖y‖ ‖s − Hy‖``.

  A pair with ``‖s − Hy‖ ≤ √ε ‖s‖`` is also refused: ``H`` already maps ``y`` to ``s``
  up to rounding (e.g. a pair the store holds), and the rounding error's direction would
  otherwise pass the scale-free angle test.
  """
  residual = s - sr1_inverse_product(store, y)
  lhs = jnp.abs(jnp.vdot(y, residual))
  residual_norm = jnp.linalg.norm(residual)
  informative = residual_norm > jnp.sqrt(jnp.finfo(residual.dtype).eps) * jnp.linalg.norm(s)
  return ((lhs >= tolerance * jnp.linalg.norm(y) * residual_norm) & (lhs > 0)
          & informative)
