"""CurveBall (Henriques et al., curveball.md): heavy-ball momentum with a curvature term.

One step, with ``Ĥ = Jᵀ H_L J`` the GGN and ``g`` the gradient (curveball.md §3):

    Δz = Jᵀ (H_L J z + ∇_o L) + λ z            (eq. 17–18: ONE J-product, ONE Jᵀ-product)
    z  ← ρ z − β Δz                            (eq. 15)
    w  ← w + α z                               (eq. 16)

``ρ`` and ``β`` minimise the damped quadratic model along ``{Δz, z}`` (eq. 19, a 2×2
solve whose entries need one more J-product, ``J Δz``); ``α = 1``. Every
``damping_period`` steps ``λ`` follows the trust-region rule of §3.4 with
``γ = (f(w + αz) − f(w)) / f̂(αz)``, which costs one extra forward pass on those steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvax import extra_args as extra_args_lib
from curvax import losses as losses_lib
from curvax import nonfinite
from curvax import quadratic
from curvax._validation import check_positive, check_fraction

PyTree = Any


class CurveBallState(NamedTuple):
  """State of :func:`curveball`.

  Attributes:
    z: the running estimate of the damped Newton step ``−(Ĥ + λI)⁻¹ g`` (params-shaped).
    damping: ``λ``.
    count: steps taken (finite batches only).
    loss: the loss at the parameters the last finite step started from — for logging,
      free (it comes from the step's own forward pass).
    rho, beta: the coefficients the last finite step used.
    reduction_ratio: the last ``γ`` of the λ rule (NaN before the first evaluation).
    num_skipped: batches whose loss or curvature products were not finite; such a batch
      leaves parameters and every other field unchanged.
  """
  z: PyTree
  damping: jax.Array
  count: jax.Array
  loss: jax.Array
  rho: jax.Array
  beta: jax.Array
  reduction_ratio: jax.Array
  num_skipped: jax.Array


def curveball(loss: "losses_lib.Loss | str", *, learning_rate: float = 1.0,
              rho: Optional[float] = None, beta: Optional[float] = None,
              damping: float = 10.0, damping_period: int = 5,
              damping_factor: float = 0.999, min_damping: float = 1e-8,
              max_damping: float = 1e8,
              axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
  """CurveBall as an optax transformation (curveball.md eq. 14–19, §3.4).

  Use it as ``tx.update(grads_or_None, state, params, predict_fn=..., targets=...)``:
  ``predict_fn(params) -> outputs`` is the network on the current batch and ``targets``
  what ``loss`` compares the outputs with (or pass ``linearization=`` instead, see
  :mod:`curvax.extra_args`). Pass ``None`` for the updates: the gradient comes from the
  step's own fused product. Passing gradients instead (e.g. after
  ``optax.add_decayed_weights`` in a chain) uses them for ``g`` at the same cost.

  Args:
    loss: a :class:`curvax.losses.Loss` or its name.
    learning_rate: ``α`` in ``w ← w + αz`` (eq. 16); 1 is the optimum of the model.
    rho: fixed decay ``ρ`` (eq. 15). With ``beta`` fixed too, the eq. 19 solve and its
      extra J-product are skipped. ``None`` (default): automatic — jointly with ``β``
      by eq. 19, or, when ``beta`` is fixed, the best ``ρ`` given that ``β``.
    beta: fixed step ``β`` on ``z`` (eq. 15); ``None``: automatic (with ``rho`` fixed,
      the best ``β`` given that ``ρ``).
    damping: initial ``λ`` — 10 without batch normalisation, 1 with it (§3.4).
    damping_period: apply the λ rule every this many steps (§3.4: 5); 0 disables it.
    damping_factor: ``λ ← λ·factor`` if ``γ > 3/2``, ``λ ← λ/factor`` if ``γ < 1/2``.
    min_damping, max_damping: bounds ``λ`` is kept within.
    axis_name: data-parallel axis (``shard_map`` / ``pmap``) the batch is split over;
      products, the loss and the eq. 19 / §3.4 statistics are averaged over it, so every
      device takes the global-batch step. A gradient passed as ``updates`` must already
      be the global one. Not needed under ``jax.jit`` with sharded inputs.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`CurveBallState`.
  """
  loss = losses_lib.get(loss)
  check_positive("learning_rate", learning_rate)
  check_positive("damping", damping)
  check_fraction("damping_factor", damping_factor)
  if damping_period < 0:
    raise ValueError(f"damping_period must be >= 0 (0 disables the λ rule), got "
                     f"{damping_period}.")
  if not 0 < min_damping <= damping <= max_damping:
    raise ValueError(f"damping must lie in [min_damping, max_damping] = "
                     f"[{min_damping}, {max_damping}] with min_damping > 0, got {damping}.")
  if rho is not None and not 0 <= rho <= 1:
    raise ValueError(f"rho must lie in [0, 1], got {rho}.")
  if beta is not None:
    check_positive("beta", beta)
  automatic = rho is None or beta is None

  def init_fn(params):
    scalar = lambda v: jnp.asarray(v, jnp.float32)
    return CurveBallState(
        z=optax.tree.zeros_like(params), damping=scalar(damping),
        count=jnp.zeros((), jnp.int32), loss=scalar(jnp.nan), rho=scalar(0.0),
        beta=scalar(0.0), reduction_ratio=scalar(jnp.nan),
        num_skipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, predict_fn=None, targets=None,
                linearization=None, **extra_args):
    del extra_args  # Other transforms' arguments in an optax.chain.
    lin = extra_args_lib.linearization_from(
        "curveball", loss, params, predict_fn=predict_fn, targets=targets,
        linearization=linearization, axis_name=axis_name)
    updates = extra_args_lib.given_gradient(updates)
    # Curvature statistics (λ, ρ, β, γ) in at least float32, whatever the params' dtype.
    stat_dtype = jnp.promote_types(lin.loss_value.dtype, jnp.float32)
    z, lam = state.z, state.damping.astype(stat_dtype)
    fused = lin.fused_ggn_vp(z)
    if updates is None:
      delta = fused.product
      grad_dot = lambda d, jd: lin.output_vdot(lin.output_grad, jd)
    else:
      # The user's gradient replaces Jᵀ∇L: Δz = Jᵀ H_L J z + g, still one Jᵀ-product.
      delta = optax.tree.add(lin.vjp(fused.hjz), updates)
      grad_dot = lambda d, jd: optax.tree.vdot(updates, d).astype(stat_dtype)
    delta = _cast_like(optax.tree.add_scale(delta, lam, z), z)  # eq. 18

    if automatic:
      j_delta = lin.jvp(delta)
      model = quadratic.build([j_delta, fused.jz], [delta, z],
                              output_hvp=lin.output_hvp,
                              gradient_dots=[grad_dot(delta, j_delta),
                                             grad_dot(z, fused.jz)],
                              damping=lam, output_vdot=lin.output_vdot)
      new_rho, new_beta = _coefficients(model)
      j_new_z = new_rho * fused.jz - new_beta * j_delta
    else:
      new_rho = jnp.asarray(rho, stat_dtype)
      new_beta = jnp.asarray(beta, stat_dtype)
      j_new_z = None
    new_z = _cast_like(
        optax.tree.add_scale(optax.tree.scale(new_rho, z), -new_beta, delta), z)
    step = optax.tree.scale(learning_rate, new_z)

    new_damping, ratio = _damping_rule(state, lin, params, step, j_new_z, updates, lam)
    finite = nonfinite.all_finite(lin.loss_value, new_z, new_rho, new_beta)
    new_state = CurveBallState(
        z=new_z, damping=new_damping.astype(jnp.float32), count=state.count + 1,
        loss=lin.loss_value.astype(jnp.float32), rho=new_rho.astype(jnp.float32),
        beta=new_beta.astype(jnp.float32), reduction_ratio=ratio.astype(jnp.float32),
        num_skipped=state.num_skipped)
    return nonfinite.guard(finite, step, new_state, state)

  def _coefficients(model):
    """``(ρ, β)`` minimising the damped model over the coefficients not fixed.

    Both free: the 2×2 solve of eq. 19 (coefficients ``[−β, ρ]``). One fixed: the
    other's 1×1 solve with the fixed one's term moved into the linear part — the best
    value GIVEN the fixed one, not the joint optimum's.
    """
    if rho is None and beta is None:
      neg_beta, new_rho = quadratic.minimiser(model)  # eq. 19
      return new_rho, -neg_beta
    dtype = model.linear.dtype
    if rho is not None:  # minimise over x₀ = −β with x₁ = ρ fixed
      fixed, free = jnp.asarray(rho, dtype), 0
    else:  # minimise over x₁ = ρ with x₀ = −β fixed
      fixed, free = -jnp.asarray(beta, dtype), 1
    other = 1 - free
    line = quadratic.QuadraticModel(
        model.curvature[free:free + 1, free:free + 1],
        model.damped[free:free + 1, free:free + 1],
        model.linear[free:free + 1] + fixed * model.damped[free, other][None])
    (solved,) = quadratic.minimiser(line)
    return (solved, -fixed) if free == 1 else (fixed, -solved)

  def _damping_rule(state, lin, params, step, j_new_z, updates, lam):
    """§3.4: every ``damping_period`` steps, ``γ = Δf / f̂(αz)`` rescales ``λ``."""
    if damping_period == 0:
      return lam, state.reduction_ratio

    def evaluate(_):
      j_step = (learning_rate * j_new_z if j_new_z is not None else lin.jvp(step))
      grad_step = (lin.output_vdot(lin.output_grad, j_step) if updates is None
                   else optax.tree.vdot(updates, step))
      predicted = grad_step + 0.5 * lin.output_vdot(j_step, lin.output_hvp(j_step))
      actual = (lin.loss_at(optax.tree.add(params, step)).astype(predicted.dtype)
                - lin.loss_value.astype(predicted.dtype))
      ratio = quadratic.reduction_ratio(actual, predicted)
      new_lam = quadratic.levenberg_marquardt(
          lam, ratio, factor=damping_factor, lower=0.5, upper=1.5,
          min_damping=min_damping, max_damping=max_damping)
      return new_lam, ratio.astype(jnp.float32)

    def keep(_):
      return lam, state.reduction_ratio

    due = (state.count + 1) % damping_period == 0
    return jax.lax.cond(due, evaluate, keep, None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """``tree`` with each leaf in the dtype of ``like``'s (``z`` keeps the params' dtypes
  when the loss is computed in a wider one, e.g. bfloat16 params with a float32 loss)."""
  return jax.tree.map(lambda a, b: a.astype(b.dtype), tree, like)
