"""Curvature state of the Kronecker-factored optimisers: factors, their averages, the
damped inverses, and the preconditioner they define.

Storage is allocated from parameter shapes alone (:func:`init`), so ``optax``'s
``init(params)`` needs no model and the state never changes structure — the step is
jitted once. Slots are per parameter leaf, in ``jax.tree.leaves`` order:

* a leaf with two or more axes (a possible kernel) reserves ``Q̃`` of size
  ``∏shape[:-1] + 1`` and ``𝒢̃`` of size ``shape[-1]``, with the exceptions of
  :func:`curvax.kron.capture.slot_for` (an embedding table reserves a diagonal ``Q̃``,
  stored as a vector; an attention query/key/value kernel splits after its first axis),
  plus their damped inverses;
* a leaf with at most one axis (a LayerNorm scale, a bias) reserves a full
  ``dim × dim`` block and its damped inverse, where ``dim`` is its size, or twice it
  for a ``scale`` with a same-shape ``bias`` beside it (their joint block, stored at the
  scale); a ``bias`` beside a ``kernel`` with slots reserves nothing (it is part of the
  kernel's block): :func:`curvax.kron.full_blocks.vector_groups`. Blocks larger than
  ``max_factor_dim`` are not reserved;
* every leaf reserves a diagonal of its own shape for the fallback block.

At each step the captured blocks fill their kernel's slots (a layer without bias leaves
the last row and column of ``Q̃`` zero: it is decoupled and never reached by a
gradient); slots of leaves that turn out not to be kernels stay unused.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from curvax import nonfinite
from curvax.kron import inverse as inverse_lib
from curvax.kron import full_blocks as full_lib
from curvax.kron.capture import Capture, Slot, leaf_slots
from curvax.kron.factors import Estimate

Array = jax.Array
PyTree = Any


class Factors(NamedTuple):
  """Moving averages of the factors, per parameter leaf.

  Attributes:
    q, g: ``Q̃`` and ``𝒢̃`` slots (``None`` for leaves that cannot be kernels).
    diag: the fallback diagonal of every leaf.
    full: full ``(dim, dim)`` blocks of normalisation layers and vector leaves, at the
      leaf that owns them (``None`` elsewhere).
  """
  q: tuple
  g: tuple
  diag: tuple
  full: tuple


class Inverse(NamedTuple):
  """The damped inverses ``(Q̃ + ω√k I)⁻¹`` and ``(𝒢̃ + ω⁻¹√k I)⁻¹`` the
  preconditioner applies, per leaf (eq. 36), and ``(F + kI)⁻¹`` of the full blocks."""
  q: tuple
  g: tuple
  full: tuple


def _dtype(leaf):
  """Factors and inverses in at least float32 (bfloat16 params get float32 curvature)."""
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


def init(params: PyTree, *, max_factor_dim: Optional[int] = None) -> tuple[Factors,
                                                                            Inverse]:
  """Zero factors and identity inverses for every slot."""
  q, g, diag, q_inv, g_inv, full, full_inv = [], [], [], [], [], [], []
  kernel_slots = leaf_slots(params, max_factor_dim)
  full_dims = full_lib.reserved_dims(params, kernel_slots, max_factor_dim)
  for leaf, slot, dim in zip(jax.tree.leaves(params), kernel_slots, full_dims):
    dtype = _dtype(leaf)
    diag.append(jnp.zeros(jnp.shape(leaf), dtype))
    full.append(None if dim is None else jnp.zeros((dim, dim), dtype))
    full_inv.append(None if dim is None else jnp.eye(dim, dtype=dtype))
    if slot is None:
      q.append(None), g.append(None), q_inv.append(None), g_inv.append(None)
      continue
    dq, dg = slot.q_dim, slot.g_dim
    q.append(jnp.zeros((dq,) if slot.diagonal else (dq, dq), dtype))
    g.append(jnp.zeros((dg, dg), dtype))
    q_inv.append(jnp.ones((dq,), dtype) if slot.diagonal else jnp.eye(dq, dtype=dtype))
    g_inv.append(jnp.eye(dg, dtype=dtype))
  return (Factors(tuple(q), tuple(g), tuple(diag), tuple(full)),
          Inverse(tuple(q_inv), tuple(g_inv), tuple(full_inv)))


def _pad_to(matrix: Array, size: int) -> Array:
  pad = size - matrix.shape[0]
  if matrix.ndim == 1:  # a diagonal factor (no bias slot)
    return matrix
  return jnp.pad(matrix, ((0, pad), (0, pad))) if pad else matrix


def estimate_finite(estimate: Estimate) -> Array:
  """Whether a batch's estimate is finite, from the diagonals of its factors.

  Every factor is positive semi-definite (a Gram matrix, or KFRA's Hadamard product of
  such matrices), so ``|F_ij| ≤ √(F_ii F_jj)``, and a NaN or infinity anywhere in the
  rows that formed it (``inf·0``, ``inf − inf``) reaches the diagonal: reading the
  diagonals (``n`` entries) replaces a pass over the ``n²``.
  """
  diagonals = [f if f.ndim == 1 else jnp.diagonal(f)
               for f in (*estimate.q, *estimate.g, *estimate.full)]
  return nonfinite.all_finite(diagonals, estimate.diag)


def update(factors: Factors, estimate: Estimate, capture: Capture, *, decay: float,
           first: Array, accept: Array = True) -> Factors:
  """Exponential moving averages ``F ← decay·F + (1 − decay)·F̂`` (the estimate alone
  on the first step), for the captured blocks and the fallback diagonals.

  Where ``accept`` is false (a non-finite batch) every factor keeps its old value: the
  choice is made inside the same elementwise pass as the average.
  """
  weight = jnp.where(first, 0.0, decay)

  def mix(old, new):
    new = weight * old + (1 - weight) * new.astype(old.dtype)
    return jnp.where(accept, new, old).astype(old.dtype)

  q, g, diag = list(factors.q), list(factors.g), list(factors.diag)
  full = list(factors.full)
  for block, q_hat, g_hat in zip(capture.blocks, estimate.q, estimate.g):
    i = block.kernel
    q[i] = mix(q[i], _pad_to(q_hat, q[i].shape[0]))
    g[i] = mix(g[i], g_hat)
  for block, f_hat in zip(capture.full_blocks, estimate.full):
    full[block.owner] = mix(full[block.owner], f_hat)
  if estimate.diag is not None:
    for i, d_hat in zip(capture.fallback, estimate.diag):
      diag[i] = mix(diag[i], d_hat)
  return Factors(tuple(q), tuple(g), tuple(diag), tuple(full))


def invert(factors: Factors, previous: Inverse, capture: Capture,
           damping: Array) -> Inverse:
  """Fresh damped inverses of the captured blocks' factors for ``k = damping``
  (eq. 36–38) and ``(F + kI)⁻¹`` of the full blocks (other slots keep ``previous``)."""
  slots = {"q": list(previous.q), "g": list(previous.g), "full": list(previous.full)}
  pending = []  # ((slot, index), damped matrix): inverted together, see spd_inverses
  for block in capture.blocks:
    i = block.kernel
    k = damping.astype(factors.q[i].dtype)
    q_damped, g_damped = inverse_lib.damped_factors(
        factors.q[i], factors.g[i], k, q_dim=block.q_dim, g_dim=block.out_dim)
    if q_damped.ndim == 1:
      slots["q"][i] = 1 / q_damped
    else:
      pending.append((("q", i), q_damped))
    pending.append((("g", i), g_damped))
  for block in capture.full_blocks:
    matrix = factors.full[block.owner]
    pending.append((("full", block.owner),
                    inverse_lib.add_to_diagonal(matrix, damping.astype(matrix.dtype))))
  inverses = inverse_lib.spd_inverses([matrix for _, matrix in pending])
  for ((slot, i), _), inverse in zip(pending, inverses):
    slots[slot][i] = inverse
  return Inverse(tuple(slots["q"]), tuple(slots["g"]), tuple(slots["full"]))


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
  """``δ̃ = C̃⁻¹ ∇f`` (eq. 33–36): per block ``(Q̃ + ω√k I)⁻¹ V (𝒢̃ + ω⁻¹√k I)⁻¹`` with the
  stored inverses (made by :func:`invert` for ``k = damping`` = γ + η); per full block
  ``(F + kI)⁻¹ g`` on its leaves' gradients flattened and concatenated; per fallback
  leaf ``g / (d + k)`` with ``d`` the diagonal estimate (``fallback="diagonal"``) or
  ``d = 1`` (``"identity"``)."""

  def block_solve(block, v):
    q_inv, g_inv = inverse.q[block.kernel], inverse.g[block.kernel]
    v = v.astype(q_inv.dtype)
    return (q_inv[:, None] * v if q_inv.ndim == 1 else q_inv @ v) @ g_inv

  def full_solve(owner, v):
    full_inv = inverse.full[owner]
    return full_inv @ v.astype(full_inv.dtype)

  return apply_blocks(capture, grad, factors, damping, block_solve, full_solve,
                      fallback=fallback)


def apply_blocks(capture: Capture, grad: PyTree, factors: Factors, damping: Array,
                 block_solve, full_solve, *, fallback: str = "diagonal") -> PyTree:
  """The block-diagonal preconditioner over ``grad``: ``block_solve(block, V)`` on each
  captured block's gradient ``V`` (``(in [+ 1], out)``, padded to its ``Q̃`` slot),
  ``full_solve(owner, v)`` on each full block's flattened gradient, and
  ``g / (d + k)`` on each fallback leaf (``d`` the diagonal estimate, or 1 with
  ``fallback="identity"``); results are cast back to the leaves' dtypes."""
  leaves, treedef = jax.tree.flatten(grad)
  out = list(leaves)
  for block in capture.blocks:
    x = block_solve(block, _block_matrix(leaves, block, factors.q[block.kernel].shape[0]))
    kernel_leaf = leaves[block.kernel]
    out[block.kernel] = x[:block.in_dim].reshape(kernel_leaf.shape).astype(
        kernel_leaf.dtype)
    if block.bias is not None:
      bias_leaf = leaves[block.bias]
      out[block.bias] = x[block.in_dim].reshape(bias_leaf.shape).astype(bias_leaf.dtype)
  for block in capture.full_blocks:
    v = jnp.concatenate([leaves[j].reshape(-1) for j in block.leaves])
    x, start = full_solve(block.owner, v), 0
    for j in block.leaves:
      size = leaves[j].size
      out[j] = x[start:start + size].reshape(leaves[j].shape).astype(leaves[j].dtype)
      start += size
  for i in capture.fallback:
    curvature = factors.diag[i] if fallback == "diagonal" else 1.0
    out[i] = (leaves[i] / (curvature + damping)).astype(leaves[i].dtype)
  return jax.tree.unflatten(treedef, out)


def slots(factors: Factors) -> tuple:
  """Per parameter leaf, the :class:`~curvax.kron.capture.Slot` the state reserves, or
  ``None`` (for :func:`curvax.kron.capture`'s ``slots``)."""
  return tuple(None if q is None else Slot(q.shape[0], g.shape[0], q.ndim == 1)
               for q, g in zip(factors.q, factors.g))


def full_slots(factors: Factors) -> tuple:
  """Per parameter leaf, the size of the full block the state reserves at it, or
  ``None`` (for :func:`curvax.kron.capture`'s ``full_slots``)."""
  return tuple(None if f is None else f.shape[0] for f in factors.full)
