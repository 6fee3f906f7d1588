"""The local quadratic model shared by every solver's step-size and damping rules.

Around ``w`` the objective is modelled as (curveball.md eq. 11–12)

    f̂(Δ) = gᵀΔ + ½ Δᵀ (C + λI) Δ,   C = Jᵀ H_L J (the GGN),

and a step is a combination ``Δ = Σ_i x_i d_i`` of candidate directions. With the Gram
matrix ``M_ij = d_iᵀ (C + λI) d_j`` and ``b_i = gᵀ d_i``, the best coefficients solve
``M x = −b``: CurveBall's automatic ρ and β (curveball.md eq. 19, directions Δz and z),
KFAC's step size α* and momentum (kfra_kflr.md appendix), and the 1×1 case of a single
direction. The reduction ratio ``ρ = (f(w+Δ) − f(w)) / f̂(Δ)`` drives every
Levenberg-Marquardt damping rule.

Every ``d_i`` enters through its output-space image ``J d_i`` (one forward-mode product),
because ``d_iᵀ C d_j = (J d_i)ᵀ H_L (J d_j)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


class QuadraticModel(NamedTuple):
  """``f̂(x) = bᵀx + ½ xᵀ M x`` over the coefficients of the candidate directions.

  ``curvature`` is ``M`` without damping (``d_iᵀ C d_j``); ``damped`` adds
  ``λ d_iᵀ d_j``.
  """
  curvature: Array
  damped: Array
  linear: Array


def build(output_directions: Sequence[Array], directions: Sequence, *,
          output_hvp: Callable[[Array], Array], gradient_dots: Sequence[Array],
          damping: Array,
          output_vdot: Optional[Callable[[Array, Array], Array]] = None) -> QuadraticModel:
  """Gram matrices of the candidate directions under ``C`` and ``C + λI``.

  Entries are accumulated in at least float32, so bfloat16 parameters get a well-posed
  solve.

  Args:
    output_directions: ``J d_i`` for each direction.
    directions: the parameter-space directions ``d_i`` (pytrees), for ``λ d_iᵀ d_j``.
    output_hvp: ``u ↦ H_L u``.
    gradient_dots: ``gᵀ d_i`` for each direction.
    damping: ``λ``.
    output_vdot: ``(a, b) ↦ aᵀb`` over the global batch for output-space arrays —
      :meth:`curvax.Linearization.output_vdot` under data parallelism; a plain sum by
      default.
  """
  output_vdot = output_vdot or (lambda a, b: jnp.sum(_wide(a) * _wide(b)))
  curved = [output_hvp(u) for u in output_directions]
  n = len(output_directions)
  wide_directions = [jax.tree.map(_wide, d) for d in directions]
  # Both matrices are symmetric: each entry above the diagonal is computed once (a pass
  # over two parameter-sized pytrees saved per pair) and mirrored.
  curvature = _symmetric(n, lambda i, j: output_vdot(output_directions[i], curved[j]))
  overlap = _symmetric(n, lambda i, j: optax.tree.vdot(wide_directions[i],
                                                       wide_directions[j]))
  linear = jnp.stack([jnp.asarray(d) for d in gradient_dots])
  dtype = jnp.result_type(curvature, overlap, linear, jnp.float32)
  curvature, overlap, linear = (a.astype(dtype) for a in (curvature, overlap, linear))
  return QuadraticModel(curvature, curvature + damping * overlap, linear)


def _symmetric(n: int, entry: Callable[[int, int], Array]) -> Array:
  """The symmetric ``n × n`` matrix with ``entry(i, j)`` for ``i <= j``."""
  upper = {(i, j): entry(i, j) for i in range(n) for j in range(i, n)}
  return jnp.array([[upper[min(i, j), max(i, j)] for j in range(n)] for i in range(n)])


def _wide(a: Array) -> Array:
  """``a`` in at least float32 (curvature statistics are never kept in bfloat16)."""
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def minimiser(model: QuadraticModel) -> Array:
  """Coefficients ``x = −M⁺ b`` minimising the damped model.

  The pseudo-inverse makes a degenerate direction (e.g. CurveBall's ``z = 0`` on its
  first step) drop out, leaving the lower-dimensional solve. The solve is on the
  Jacobi-scaled matrix ``D M D`` (``D = diag(M)^{-1/2}``, unit diagonal), so the
  cutoff measures collinearity of the directions, not their lengths (CurveBall's ``z``
  is often orders of magnitude shorter than ``Δz``). Eigenvalues of ``D M D`` below
  ``√ε`` of the largest (ε: the dtype's machine epsilon) count as zero: the entries
  are long dot products with rounding errors above ``ε·‖M‖``, so collinear directions
  would otherwise get huge, cancelling coefficients fitted to rounding noise.
  """
  matrix = 0.5 * (model.damped + model.damped.T)
  rtol = float(jnp.finfo(matrix.dtype).eps) ** 0.5
  diagonal = jnp.diagonal(matrix)
  usable = diagonal > 0
  scale = jnp.where(usable, 1.0 / jnp.sqrt(jnp.where(usable, diagonal, 1.0)), 0.0)
  scaled = scale[:, None] * matrix * scale[None, :]
  if matrix.shape[0] <= 2:
    inverse = _small_symmetric_pinv(scaled, rtol)
  else:
    inverse = jnp.linalg.pinv(scaled, rtol=rtol, hermitian=True)
  return -scale * (inverse @ (scale * model.linear))


def minimiser_bounded(model: QuadraticModel, index: int, low: float, high: float) -> Array:
  """:func:`minimiser` with coefficient ``index`` constrained to ``[low, high]``.

  The model is convex in the coefficients (``M`` is a damped Gram matrix), so when the
  free minimiser puts ``x_index`` outside the interval, the constrained one has
  ``x_index`` at the nearer bound and the other coefficients minimising the model with
  it fixed: ``x_rest = −M_rr⁺ (b_r + M_r,index · x_index)``.
  """
  if not 0 <= index < model.linear.shape[0]:
    raise ValueError(f"minimiser_bounded: index {index} out of range for "
                     f"{model.linear.shape[0]} coefficient(s).")
  free = minimiser(model)
  fixed = jnp.clip(free[index], low, high)
  rest = np.array([i for i in range(model.linear.shape[0]) if i != index])
  if not rest.size:
    return fixed[None]
  block = lambda m: m[rest[:, None], rest[None, :]]
  sub = QuadraticModel(block(model.curvature), block(model.damped),
                       model.linear[rest] + model.damped[rest, index] * fixed)
  constrained = jnp.zeros_like(free).at[rest].set(minimiser(sub)).at[index].set(fixed)
  return jnp.where(free[index] == fixed, free, constrained)


def _small_symmetric_pinv(matrix: Array, rtol: float) -> Array:
  """Pseudo-inverse of a symmetric 1×1 or 2×2 matrix from its closed-form eigensystem.

  Same cutoff as ``jnp.linalg.pinv(hermitian=True)``, but elementwise arithmetic: a
  LAPACK / cuSOLVER eigendecomposition call costs more than a whole CurveBall step's
  remaining scalar work on an accelerator.
  """
  if matrix.shape[0] == 1:
    a = matrix[0, 0]
    keep = jnp.abs(a) > 0
    return jnp.where(keep, 1.0 / jnp.where(keep, a, 1.0), 0.0)[None, None]
  a, b, c = matrix[0, 0], matrix[0, 1], matrix[1, 1]
  theta = 0.5 * jnp.arctan2(2 * b, a - c)  # rotation diagonalising the matrix
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  vectors = jnp.stack([jnp.stack([cos, sin]), jnp.stack([-sin, cos])])  # rows
  values = jnp.stack([a * cos**2 + 2 * b * sin * cos + c * sin**2,
                      a * sin**2 - 2 * b * sin * cos + c * cos**2])
  keep = jnp.abs(values) > rtol * jnp.max(jnp.abs(values))
  inverse = jnp.where(keep, 1.0 / jnp.where(keep, values, 1.0), 0.0)
  return (vectors.T * inverse) @ vectors


def predicted_change(model: QuadraticModel, coefficients: Array, *,
                     damped: bool = False) -> Array:
  """``f̂(x) = bᵀx + ½ xᵀ M x`` with the undamped (default) or damped ``M``."""
  matrix = model.damped if damped else model.curvature
  return model.linear @ coefficients + 0.5 * coefficients @ matrix @ coefficients


def reduction_ratio(actual_change: Array, predicted: Array) -> Array:
  """``ρ = Δf / Δf̂``, 1 when the model is exact; 0 where the model predicts no change."""
  safe = jnp.where(predicted == 0, 1.0, predicted)
  return jnp.where(predicted == 0, 0.0, actual_change / safe)


def levenberg_marquardt(damping: Array, ratio: Array, *, factor: Array,
                        lower: float = 0.25, upper: float = 0.75,
                        min_damping: float = 0.0, max_damping: float = jnp.inf,
                        increase: Optional[Array] = None) -> Array:
  """Levenberg-Marquardt rule: ``λ·factor`` if ``ρ > upper``, ``λ/factor`` if ``ρ < lower``.

  ``factor < 1``. With ``lower = upper`` this is kfra_kflr.md's τ rule; CurveBall's
  §3.4 rule is ``factor = 0.999``, ``lower = 1/2``, ``upper = 3/2``. ``increase``, when
  given, multiplies ``λ`` instead of ``1/factor`` when ``ρ < lower`` (Hessian-free's
  escalating factor). The result is clipped to ``[min_damping, max_damping]``.
  """
  damping = jnp.where(ratio > upper, damping * factor, damping)
  raised = damping / factor if increase is None else damping * increase
  damping = jnp.where(ratio < lower, raised, damping)
  return jnp.clip(damping, min_damping, max_damping)
