"""Curvature state of the Kronecker-factored optimisers: factors, their averages and
eigendecompositions, and the preconditioner they define.

Storage is allocated from parameter shapes alone (:func:`init`), so ``optax``'s
``init(params)`` needs no model and the state never changes structure — the step is
jitted once. Slots are per parameter leaf, in ``jax.tree.leaves`` order:

* a leaf with two or more axes (a possible kernel) reserves ``Q̃`` of size
  ``∏shape[:-1] + 1`` and ``𝒢̃`` of size ``shape[-1]``
  (:func:`curvax.kron.capture.slot_dims`), plus their eigendecompositions;
* every leaf reserves a diagonal of its own shape for the fallback block.

At each step the captured blocks fill their kernel's slots (a layer without bias leaves
the last row and column of ``Q̃`` zero: it is decoupled and never reached by a
gradient); slots of leaves that turn out not to be kernels stay unused.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from curvax.kron import inverse as inverse_lib
from curvax.kron.capture import Capture, slot_dims
from curvax.kron.factors import Estimate

Array = jax.Array
PyTree = Any


class Factors(NamedTuple):
  """Moving averages of the factors, per parameter leaf.

  Attributes:
    q, g: ``Q̃`` and ``𝒢̃`` slots (``None`` for leaves that cannot be kernels).
    diag: the fallback diagonal of every leaf.
  """
  q: tuple
  g: tuple
  diag: tuple


class Inverse(NamedTuple):
  """Eigendecompositions of the factors the preconditioner uses, per leaf."""
  q: tuple
  g: tuple


def _dtype(leaf):
  dtype = jnp.result_type(leaf)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def init(params: PyTree, *, max_factor_dim: Optional[int] = None) -> tuple[Factors,
                                                                            Inverse]:
  """Zero factors and identity eigendecompositions for every slot."""
  q, g, diag, q_eig, g_eig = [], [], [], [], []
  for leaf in jax.tree.leaves(params):
    dtype = _dtype(leaf)
    diag.append(jnp.zeros(jnp.shape(leaf), dtype))
    dims = slot_dims(jnp.shape(leaf), max_factor_dim)
    if dims is None:
      q.append(None), g.append(None), q_eig.append(None), g_eig.append(None)
      continue
    dq, dg = dims
    q.append(jnp.zeros((dq, dq), dtype))
    g.append(jnp.zeros((dg, dg), dtype))
    q_eig.append(inverse_lib.Eigen(jnp.eye(dq, dtype=dtype), jnp.zeros((dq,), dtype)))
    g_eig.append(inverse_lib.Eigen(jnp.eye(dg, dtype=dtype), jnp.zeros((dg,), dtype)))
  return (Factors(tuple(q), tuple(g), tuple(diag)),
          Inverse(tuple(q_eig), tuple(g_eig)))


def _pad_to(matrix: Array, size: int) -> Array:
  pad = size - matrix.shape[0]
  return jnp.pad(matrix, ((0, pad), (0, pad))) if pad else matrix


def update(factors: Factors, estimate: Estimate, capture: Capture, *, decay: float,
           first: Array) -> Factors:
  """Exponential moving averages ``F ← decay·F + (1 − decay)·F̂`` (the estimate alone
  on the first step), for the captured blocks and the fallback diagonals."""
  weight = jnp.where(first, 0.0, decay)
  mix = lambda old, new: (weight * old + (1 - weight) * new.astype(old.dtype)).astype(
      old.dtype)
  q, g, diag = list(factors.q), list(factors.g), list(factors.diag)
  for block, q_hat, g_hat in zip(capture.blocks, estimate.q, estimate.g):
    i = block.kernel
    q[i] = mix(q[i], _pad_to(q_hat, q[i].shape[0]))
    g[i] = mix(g[i], g_hat)
  if estimate.diag is not None:
    for i, d_hat in zip(capture.fallback, estimate.diag):
      diag[i] = mix(diag[i], d_hat)
  return Factors(tuple(q), tuple(g), tuple(diag))


def decompose(factors: Factors, previous: Inverse, capture: Capture) -> Inverse:
  """Fresh eigendecompositions of the captured blocks' factors."""
  q, g = list(previous.q), list(previous.g)
  for block in capture.blocks:
    i = block.kernel
    q[i] = inverse_lib.eigh(factors.q[i])
    g[i] = inverse_lib.eigh(factors.g[i])
  return Inverse(tuple(q), tuple(g))


def _block_matrix(leaves, block, q_size):
  """The block's gradient as ``(in [+ 1], out)``, padded to the slot."""
  kernel = leaves[block.kernel].reshape(block.in_dim, block.out_dim)
  rows = [kernel]
  if block.bias is not None:
    rows.append(leaves[block.bias].reshape(1, block.out_dim))
  v = jnp.concatenate(rows, axis=0) if len(rows) > 1 else kernel
  pad = q_size - v.shape[0]
  return jnp.pad(v, ((0, pad), (0, 0))) if pad else v


def precondition(capture: Capture, grad: PyTree, factors: Factors, inverse: Inverse,
                 damping: Array, *, fallback: str = "diagonal") -> PyTree:
  """``δ̃ = C̃⁻¹ ∇f`` (eq. 33–36): per block the factored damped Kronecker inverse with
  ``k = damping`` (= γ + η); per fallback leaf ``g / (d + k)`` with ``d`` the diagonal
  estimate (``fallback="diagonal"``) or ``d = 1`` (``"identity"``)."""
  leaves, treedef = jax.tree.flatten(grad)
  out = list(leaves)
  for block in capture.blocks:
    i = block.kernel
    q_eig, g_eig = inverse.q[i], inverse.g[i]
    v = _block_matrix(leaves, block, q_eig.vals.shape[0]).astype(q_eig.vecs.dtype)
    x = inverse_lib.factored_inverse(q_eig, g_eig, v, damping.astype(v.dtype),
                                     q_dim=block.q_dim, g_dim=block.out_dim)
    kernel_leaf = leaves[block.kernel]
    out[block.kernel] = x[:block.in_dim].reshape(kernel_leaf.shape).astype(
        kernel_leaf.dtype)
    if block.bias is not None:
      bias_leaf = leaves[block.bias]
      out[block.bias] = x[block.in_dim].reshape(bias_leaf.shape).astype(bias_leaf.dtype)
  for i in capture.fallback:
    curvature = factors.diag[i] if fallback == "diagonal" else 1.0
    out[i] = (leaves[i] / (curvature + damping)).astype(leaves[i].dtype)
  return jax.tree.unflatten(treedef, out)
