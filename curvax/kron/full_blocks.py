"""Full curvature blocks for small parameter vectors: normalisation layers and lone biases.

Kronecker factors suit kernels; the other trainable vectors of a network — the scale
``γ`` and offset ``β`` of ``nn.LayerNorm`` / ``nn.RMSNorm``, a bias no captured layer
adds — are short (one entry per feature), so their GGN diagonal block (kfra_kflr.md
eq. 13–14 restricted to them) is stored and inverted whole:

    G_θ = Σ_n Σ_k g_{n,k} g_{n,k}ᵀ,   g_{n,k} = J_{θ,n}ᵀ u_{n,k}   (dim θ × dim θ),

with ``u_{n,k}`` the output-space columns of the estimator (KFLR: the ``K`` columns of
``H_L``'s square root, eq. 23, so ``Σ_k u uᵀ = H_n`` and the block is exact; KFAC: a
sampled ``√B ∇ℓ``, equal in expectation). Its damped inverse ``(G_θ + kI)⁻¹`` uses the
step's full damping ``k = γ + η``, as the diagonal fallback does. Two kinds of block:

* ``"norm"`` — a captured ``nn.LayerNorm`` / ``nn.RMSNorm`` computes
  ``y = x̂ ⊙ γ + β`` with the normalised input ``x̂``. Like a Dense layer it records
  ``x̂`` and adds a zero perturbation to ``y``, whose pullback gives the per-example
  output sensitivities ``s_{n,k,t} = J_{y_{n,t}}ᵀ u_{n,k}`` at every position ``t``, so
  the per-example gradients are exact:

      g_{n,k} = [ Σ_t x̂_{n,t} ⊙ s_{n,k,t} ;  Σ_t s_{n,k,t} ]   (scale, then offset),

  summed over positions (and over the layer's calls): the exact GGN block whatever the
  weight sharing, so ``weight_sharing`` does not apply. Scale and offset form ONE joint
  ``2d × 2d`` block (they are strongly coupled: ``∂y/∂γ = x̂ ∂y/∂β``).
* ``"vector"`` — a vector leaf that no captured layer uses (a standalone learned bias, a
  custom module's scale, the bias of a Dense whose kernel has no slot): only the
  parameter cotangent ``Σ_n J_{θ,n}ᵀ u_{n,k}`` of the whole batch is available, so the
  estimators multiply every column by a random sign ``r_{n,k}`` per example first:
  ``c_k = Σ_n r_{n,k} g_{n,k}`` has ``E_r[c_k c_kᵀ] = Σ_n g_{n,k} g_{n,k}ᵀ`` (the
  cross-example terms have mean zero), so ``Σ_k c_k c_kᵀ`` is an unbiased estimate of
  ``G_θ`` from the backward pass the estimator runs anyway (exact with one example);
  its noise (rank ``K`` per batch) is averaged by the factors' moving average. The
  alternative, per-example cotangents, costs one backward pass per example; the
  diagonal fallback already relies on the same signs.

Storage is reserved by ``init`` from the parameter names and shapes alone
(:func:`vector_groups`): every leaf with at most one axis gets a full block, except that
a ``bias`` next to a same-shape ``scale`` (a LayerNorm) joins the scale's block (the
scale's leaf holds the ``2d × 2d`` matrix), and a ``bias`` next to a ``kernel`` that has
Kronecker slots is left to that kernel's block. A block larger than ``max_factor_dim``
is not reserved: its leaves get the diagonal fallback, with the warning naming them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

@dataclasses.dataclass(frozen=True)
class FullBlock:
  """A full curvature block over a few small parameter leaves.

  Attributes:
    kind: ``"norm"`` (a captured normalisation layer) or ``"vector"`` (leaves no captured
      layer uses; estimated from sign-mixed parameter cotangents).
    name: the layer's module path, or the owning leaf's name.
    leaves: indices (``jax.tree.leaves`` order) of the leaves, flattened and concatenated
      in this order (a norm layer's scale, then its offset); the first owns the storage.
    scale, bias: for ``"norm"``, the leaf indices of the scale and the offset (``None``
      when the layer has none).
    calls: for ``"norm"``, the indices of the layer's calls in ``Capture.calls``.
    dim: the block's size, the leaves' total size.
  """
  kind: str
  name: str
  leaves: tuple[int, ...]
  dim: int
  scale: Optional[int] = None
  bias: Optional[int] = None
  calls: tuple[int, ...] = ()

  @property
  def owner(self) -> int:
    return self.leaves[0]


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def vector_groups(params: PyTree, kernel_slots: Sequence[Any]) -> dict[int, tuple[int, ...]]:
  """The leaves that share a full block, keyed by the leaf that stores it.

  From the names and shapes alone (so ``init`` needs no model): every leaf with at most
  one axis owns a block of its own, except

  * a ``bias`` with a same-shape ``scale`` beside it (``nn.LayerNorm``): one joint block
    ``(scale, bias)`` stored at the scale;
  * a ``bias`` beside a ``kernel`` with Kronecker slots (``kernel_slots``, per leaf: not
    ``None``) whose output factor has the bias's size: it belongs to that kernel's block.
  """
  entries = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [tuple(_key_name(k) for k in path) for path, _ in entries]
  shapes = [tuple(jnp.shape(leaf)) for _, leaf in entries]
  siblings: dict[tuple[str, ...], dict[str, int]] = {}
  for i, name in enumerate(names):
    if name:
      siblings.setdefault(name[:-1], {})[name[-1]] = i
  groups = {}
  for i, name in enumerate(names):
    if len(shapes[i]) > 1:
      continue
    here = siblings.get(name[:-1], {}) if name else {}
    last = name[-1] if name else ""
    scale, bias, kernel = here.get("scale"), here.get("bias"), here.get("kernel")
    if last == "bias":
      if scale is not None and shapes[scale] == shapes[i]:
        continue  # in the scale's joint block
      slot = kernel_slots[kernel] if kernel is not None else None
      if slot is not None and slot.g_dim == math.prod(shapes[i]):
        continue  # in its kernel's Kronecker block
    if last == "scale" and bias is not None and shapes[bias] == shapes[i]:
      groups[i] = (i, bias)
    else:
      groups[i] = (i,)
  return groups


def group_dim(params: PyTree, members: Sequence[int]) -> int:
  leaves = jax.tree.leaves(params)
  return sum(math.prod(jnp.shape(leaves[i])) for i in members)


def reserved_dims(params: PyTree, kernel_slots: Sequence[Any],
                  max_factor_dim: Optional[int]) -> list[Optional[int]]:
  """Per leaf, the size of the full block whose matrix it stores, or ``None``: the
  blocks of :func:`vector_groups` no larger than ``max_factor_dim``."""
  dims: list[Optional[int]] = [None] * len(jax.tree.leaves(params))
  for owner, members in vector_groups(params, kernel_slots).items():
    dim = group_dim(params, members)
    if max_factor_dim is None or dim <= max_factor_dim:
      dims[owner] = dim
  return dims


def build(calls: Sequence[Any], params: PyTree, leaf_names: Sequence[str],
          kernel_slots: Sequence[Any], dims: Sequence[Optional[int]], used: set[int]
          ) -> tuple[tuple[FullBlock, ...], set[int], list[tuple[str, str]]]:
  """The full blocks of one capture: ``(blocks, leaves they cover, skipped)``.

  Args:
    calls: the captured layer calls (those of kind ``"norm"`` are used here).
    params, leaf_names: the parameters and their names.
    kernel_slots: per leaf, its Kronecker slot or ``None`` (for :func:`vector_groups`).
    dims: per leaf, the full block reserved for it (:func:`reserved_dims`) or ``None``.
    used: leaves the Kronecker blocks already cover.
  """
  groups = vector_groups(params, kernel_slots)
  norm_calls: dict[int, list[int]] = {}
  for i, call in enumerate(calls):
    if call.kind == "norm":
      owner = call.kernel if call.kernel is not None else call.bias
      norm_calls.setdefault(owner, []).append(i)
  blocks, covered, skipped = [], set(), []
  for owner, members in norm_calls.items():
    first = calls[members[0]]
    leaves = tuple(j for j in (first.kernel, first.bias) if j is not None)
    dim = group_dim(params, leaves)
    if any((calls[i].kernel, calls[i].bias) != (first.kernel, first.bias)
           for i in members) or used & set(leaves):
      skipped.append((first.name, "its scale or offset is also used by another layer"))
    elif groups.get(owner) != leaves:
      skipped.append((first.name, "its scale and offset are not the parameter group the "
                                  "optimiser reserved a block for (curvax.kron."
                                  "full_blocks.vector_groups reads them from the names)"))
    elif dims[owner] != dim:
      skipped.append((first.name, f"its {dim} × {dim} curvature block exceeds "
                                  "max_factor_dim"))
    else:
      blocks.append(FullBlock("norm", first.name, leaves, dim, first.kernel, first.bias,
                              tuple(members)))
      covered |= set(leaves)
  for owner, members in groups.items():
    if (used | covered) & set(members):
      continue
    dim = group_dim(params, members)
    if dims[owner] != dim:
      skipped.append((leaf_names[owner], f"its {dim} × {dim} curvature block exceeds "
                                         "max_factor_dim"))
      continue
    blocks.append(FullBlock("vector", leaf_names[owner], members, dim))
  covered |= {j for b in blocks for j in b.leaves}
  return tuple(blocks), covered, skipped


def norm_gradients(block: FullBlock, normalised: Sequence[Array],
                   sensitivities: Sequence[Array], batch_dims: int = 0) -> Array:
  """Per-example gradients ``[Σ_t x̂ ⊙ s ; Σ_t s]`` of a norm block's scale and offset,
  shape ``(*batch, examples, dim)``, summed over positions and the layer's calls.

  Args:
    normalised: per call, the layer's ``x̂`` (features last).
    sensitivities: per call, ``J_yᵀ u`` with ``batch_dims`` leading axes (columns).
  """
  scale, offset = 0.0, 0.0
  for i in block.calls:
    s, x_hat = sensitivities[i], normalised[i]
    lead = s.shape[:batch_dims + 1]
    s = s.reshape(lead + (-1, s.shape[-1]))
    x_hat = x_hat.reshape(x_hat.shape[:1] + (-1, x_hat.shape[-1]))
    if block.scale is not None:
      scale = scale + jnp.sum(x_hat.astype(s.dtype) * s, axis=-2)
    if block.bias is not None:
      offset = offset + jnp.sum(s, axis=-2)
  parts = [p for p, leaf in ((scale, block.scale), (offset, block.bias)) if leaf is not None]
  return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def vector_rows(block: FullBlock, param_cotangents: Sequence[Array],
                batch_dims: int = 1) -> Array:
  """A vector block's leaves' cotangents flattened and concatenated,
  ``(*batch, dim)``."""
  parts = []
  for j in block.leaves:
    c = param_cotangents[j]
    parts.append(c.reshape(c.shape[:batch_dims] + (-1,)))
  return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
