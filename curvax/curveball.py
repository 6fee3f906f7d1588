"""CurveBall (Henriques et al., curveball.md): heavy-ball momentum with a curvature term.

One step, with ``Ĥ = Jᵀ H_L J`` the GGN and ``g`` the gradient (curveball.md §3):

    Δz = Jᵀ (H_L J z + ∇_o L) + λ z            (eq. 17–18: ONE J-product, ONE Jᵀ-product)
    z  ← ρ z − β Δz                            (eq. 15)
    w  ← w + α z                               (eq. 16)

``ρ`` and ``β`` minimise the damped quadratic model along ``{Δz, z}`` (eq. 19, a 2×2
solve whose entries need one more J-product, ``J Δz``); ``α = 1``.

The λ rule (§3.4) is run as the authors' code runs it (their MATLAB ``CurveBall.m`` and
PyTorch ``curveball.py`` agree): on the steps counted ``0, T, 2T, …`` (the first step
included), ``γ = (f(w + αz) − f(w)) / f̂`` on the step's own batch, where ``f̂`` is the
*damped* model ``gᵀs + ½ sᵀ(Ĥ + λI)s`` at the step taken — with ``A x = b`` the system of
eq. 19 and ``α = 1`` this is the authors' ``f̂ = −½ xᵀb``. ``λ ← λ·ω^T`` if ``γ > 3/2``
and ``λ ← λ/ω^T`` if ``γ < 1/2``, with ``ω = 0.999`` the per-iteration factor (so
``0.995`` per evaluation for ``T = 5``). The paper's text reads "a factor of 0.999" per
evaluation: ``damping_factor=0.999 ** (1 / 5)`` gives that. The undamped model, which an
earlier curvax used, keeps ``γ`` inside ``[1/2, 3/2]`` on real networks so that ``λ``
never moves; it is not offered.

Departures from the authors' code, deliberate:

* with ``rho`` and ``beta`` both fixed the authors still solve eq. 19 whenever the λ rule
  is on (and use its ``ρ, β``); curvax keeps the fixed values and evaluates the damped
  model at the step taken, which needs one J-product (``J Δz``) on evaluation steps only;
* a trial step whose loss ``f(w + αz)`` is not finite is rejected: the update is zero,
  ``z`` and the step count keep their values and ``λ`` grows as for ``γ < 1/2`` — so the
  next batch is again an evaluation step, until a step is accepted. (The authors apply
  the step.)
* a batch whose loss is not finite at the current parameters but was before the last
  update (a step between evaluations, or a learning-rate spike, landed where the loss
  overflows) returns that update reversed, clears ``z`` and raises ``λ`` as for a
  rejected trial step (:mod:`curvax.nonfinite`); other non-finite batches are skipped.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvax import extra_args as extra_args_lib
from curvax import losses as losses_lib
from curvax import nonfinite
from curvax import quadratic
from curvax._validation import (ScalarOrSchedule, check_fraction, check_in_range,
                                check_integer, check_positive, check_within, value_at)

PyTree = Any


class CurveBallState(NamedTuple):
  """State of :func:`curveball`.

  Attributes:
    z: the running estimate of the damped Newton step ``−(Ĥ + λI)⁻¹ g`` (params-shaped).
    damping: ``λ``.
    count: steps taken (finite, accepted steps only); schedules are evaluated at it and
      the λ rule runs when it is a multiple of ``damping_period``.
    loss: the loss at the parameters the last finite batch started from — for logging,
      free (it comes from the step's own forward pass).
    rho, beta: the coefficients the last finite batch computed.
    reduction_ratio: the last ``γ`` of the λ rule (NaN before the first evaluation;
      non-finite after a rejected trial step).
    num_skipped: batches whose loss or curvature products were not finite; such a batch
      leaves parameters and every other field unchanged.
    last_step_scale: ``α`` of the last update returned, which was ``α z`` with ``z`` the
      field above (0 after a rejected step or a rollback): the record a rollback
      reverses, a scalar instead of a second params-sized buffer.
    num_rolled_back: batches whose loss was not finite at the current parameters but
      was before the last update: ``−α z`` was returned, ``z`` cleared and ``λ`` raised
      as for a rejected trial step (:mod:`curvax.nonfinite`).
  """
  z: PyTree
  damping: jax.Array
  count: jax.Array
  loss: jax.Array
  rho: jax.Array
  beta: jax.Array
  reduction_ratio: jax.Array
  num_skipped: jax.Array
  last_step_scale: jax.Array
  num_rolled_back: jax.Array


def curveball(loss: "losses_lib.Loss | str", *, learning_rate: ScalarOrSchedule = 1.0,
              rho: Optional[ScalarOrSchedule] = None,
              beta: Optional[ScalarOrSchedule] = None,
              damping: float = 1.0, damping_period: int = 5,
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

  Numeric hyperparameters may be Python, NumPy or JAX scalars, so the factory works
  under ``optax.inject_hyperparams``; ``learning_rate``, ``rho`` and ``beta`` also take an
  ``optax.Schedule`` evaluated at :attr:`CurveBallState.count`.

  In a chain, the λ rule measures ``γ`` on CurveBall's own step ``αz``, before later
  transforms (clipping, weight decay, a line search) change it: the rule judges
  CurveBall's quadratic model, whose minimiser that step is, and the loss at the
  update actually applied is not known to CurveBall.

  Args:
    loss: a :class:`curvax.losses.Loss` or its name.
    learning_rate: ``α`` in ``w ← w + αz`` (eq. 16); 1 is the optimum of the model.
    rho: fixed decay ``ρ`` (eq. 15). With ``beta`` fixed too, the eq. 19 solve and its
      extra J-product are skipped (the λ rule then pays for ``J Δz`` on its own steps).
      ``None`` (default): automatic — jointly with ``β`` by eq. 19, or, when ``beta`` is
      fixed, the best ``ρ`` given that ``β``.
    beta: fixed step ``β`` on ``z`` (eq. 15); ``None``: automatic (with ``rho`` fixed,
      the best ``β`` given that ``ρ``).
    damping: initial ``λ``. 1, by measurement: on the shipped autoencoder, MLP and CNN
      (``benchmarks/results/defaults_curveball.json``, equal step counts) λ₀ = 1 ends
      lower than the paper's 10 on all three (10 never leaves the autoencoder's plateau
      in 450 steps; the λ rule moves λ by at most 0.999⁵ per 5 steps, so λ₀ is in
      effect the λ of a short run). §3.4 uses 10 without batch normalisation and 1 with
      it: ``damping=10.0`` is the paper's setting for these networks.
    damping_period: ``T``: apply the λ rule on steps ``0, T, 2T, …`` (§3.4: 5); 0
      disables it.
    damping_factor: ``ω``, the factor per iteration: each evaluation multiplies ``λ`` by
      ``ω^T`` if ``γ > 3/2`` and divides it by ``ω^T`` if ``γ < 1/2`` (the authors'
      code; ``0.999 ** (1 / T)`` gives the paper text's 0.999 per evaluation).
    min_damping, max_damping: bounds ``λ`` is kept within.
    axis_name: data-parallel axis (``shard_map`` / ``pmap``) the batch is split over;
      products, the loss and the eq. 19 / §3.4 statistics are averaged over it, so every
      device takes the global-batch step. A gradient passed as ``updates`` must already
      be the global one. Not needed under ``jax.jit`` with sharded inputs.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`CurveBallState`.
  """
  loss = losses_lib.get(loss)
  check_positive("learning_rate", learning_rate, schedule=True)
  check_positive("damping", damping)
  check_fraction("damping_factor", damping_factor)
  check_positive("min_damping", min_damping)
  check_positive("max_damping", max_damping)
  period = check_integer("damping_period", damping_period, 0)
  check_within("damping", damping, min_damping, max_damping)
  if rho is not None:
    check_in_range("rho", rho, 0.0, 1.0, schedule=True)
  if beta is not None:
    check_positive("beta", beta, schedule=True)
  s = _Settings(rho=rho, beta=beta, damping_period=damping_period,
                damping_factor=damping_factor, min_damping=min_damping,
                max_damping=max_damping,
                lambda_rule=period != 0)  # a traced period (inject_hyperparams) keeps it
  automatic = rho is None or beta is None

  def init_fn(params):
    scalar = lambda v: jnp.asarray(v, jnp.float32)
    return CurveBallState(
        z=optax.tree.zeros_like(params), damping=scalar(damping),
        count=jnp.zeros((), jnp.int32), loss=scalar(jnp.nan), rho=scalar(0.0),
        beta=scalar(0.0), reduction_ratio=scalar(jnp.nan),
        num_skipped=jnp.zeros((), jnp.int32), last_step_scale=scalar(0.0),
        num_rolled_back=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, predict_fn=None, targets=None,
                linearization=None, **extra_args):
    del extra_args  # Other transforms' arguments in an optax.chain.
    lin = extra_args_lib.linearization_from(
        "curveball", loss, params, predict_fn=predict_fn, targets=targets,
        linearization=linearization, axis_name=axis_name)
    updates = extra_args_lib.given_gradient("curveball", updates, params)
    # Curvature statistics (λ, ρ, β, γ) in at least float32, whatever the params' dtype.
    stat_dtype = jnp.promote_types(lin.loss_value.dtype, jnp.float32)
    scalar = lambda v: jnp.asarray(v, stat_dtype)
    z, lam = state.z, state.damping.astype(stat_dtype)
    alpha = scalar(value_at(learning_rate, state.count))
    fused = lin.fused_ggn_vp(z)
    if updates is None:
      delta = fused.product
      grad_dot = lambda d, jd: lin.output_vdot(lin.output_grad, jd)
    else:
      # The user's gradient replaces Jᵀ∇L: Δz = Jᵀ H_L J z + g, still one Jᵀ-product.
      delta = optax.tree.add(lin.vjp(fused.hjz), updates)
      grad_dot = lambda d, jd: optax.tree.vdot(updates, d).astype(stat_dtype)
    delta = _cast_like(optax.tree.add_scale(delta, lam, z), z)  # eq. 18

    def model_along(j_delta):
      """The damped model (eq. 19's ``A`` and ``b``) over the directions ``[Δz, z]``."""
      return quadratic.build([j_delta, fused.jz], [delta, z], output_hvp=lin.output_hvp,
                             gradient_dots=[grad_dot(delta, j_delta),
                                            grad_dot(z, fused.jz)],
                             damping=lam, output_vdot=lin.output_vdot)

    due = _lambda_rule_due(s, state.count)
    if automatic:
      model = model_along(lin.jvp(delta))
      new_rho, new_beta = _coefficients(s, model, state.count)
      model_fn = lambda: model
      # Finiteness from scalars, not a mask over the new z, so the selects in _advance
      # fuse with the z and step arithmetic: the Gram entries carry Δzᵀ Δz.
      checks = [model.damped.reshape(-1)]
    else:
      # Only the λ rule needs J Δz here. A fresh forward pass under its own conditional
      # keeps the compiled step's memory at SGD's (the linearisation's residuals would
      # have to outlive the backward pass; measured in benchmarks.step_cost).
      j_delta = jax.lax.cond(due, lambda: lin.jvp_recomputed(delta),
                             lambda: jnp.zeros_like(fused.jz))
      model_fn = functools.partial(model_along, j_delta)  # on evaluation steps only
      new_rho = scalar(value_at(rho, state.count))
      new_beta = scalar(value_at(beta, state.count))
      # Without the Gram entries, one max over |Δz| (max propagates NaN and inf).
      checks = [jnp.max(jnp.abs(d)).astype(stat_dtype)[None]
                for d in jax.tree.leaves(delta)]
    coefficients = alpha * jnp.stack([-new_beta, new_rho])  # the step αz on [Δz, z]
    new_damping, ratio, accepted = _damping_rule(
        s, state, lin, params, z, delta, coefficients, model_fn, lam, due)
    finite = jnp.all(jnp.isfinite(jnp.concatenate(
        [jnp.stack([lin.loss_value.astype(stat_dtype), new_rho, new_beta]), *checks])))
    proposal = _Proposal(delta=delta, rho=new_rho, beta=new_beta, damping=new_damping,
                         reduction_ratio=ratio, finite=finite, accepted=accepted,
                         alpha=alpha)
    return _advance(s, state, lin, params, proposal, given_gradient=updates)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _Settings(NamedTuple):
  """The λ-rule and coefficient settings of one :func:`curveball` (static)."""
  rho: Optional[ScalarOrSchedule]
  beta: Optional[ScalarOrSchedule]
  damping_period: Any
  damping_factor: Any
  min_damping: Any
  max_damping: Any
  lambda_rule: bool


class _Proposal(NamedTuple):
  """One batch's computed step, before the non-finite guard decides what is applied."""
  delta: PyTree              # Δz (eq. 18)
  rho: jax.Array
  beta: jax.Array
  damping: jax.Array         # λ after the §3.4 rule
  reduction_ratio: jax.Array
  finite: jax.Array          # loss, ρ, β and Δz finite
  accepted: jax.Array        # the λ rule's trial loss finite
  alpha: jax.Array


def _advance(s: _Settings, state: CurveBallState, lin, params, proposal: _Proposal, *,
             given_gradient) -> tuple:
  """The update and the next state: eq. 15–16 for an accepted finite step, the rollback
  of the last update (:mod:`curvax.nonfinite`), or a skip."""
  z, p = state.z, proposal
  take = p.finite & p.accepted
  # A batch that is not finite here but whose loss was before the last update (α z):
  # that update landed where the loss overflows — a learning-rate spike, or any step on the
  # batches between λ-rule evaluations, which alone look at the trial loss. Return
  # −α z, clear z (the momentum that carried the parameters there) and raise λ as for
  # a rejected trial step; a second non-finite batch in a row is skipped.
  last = lambda: jax.tree.map(
      lambda zi: (state.last_step_scale.astype(zi.dtype) * zi), z)
  undo = nonfinite.rollback_due(p.finite, params, last, lin.loss_at,
                                given_gradient=given_gradient)
  raised = quadratic.levenberg_marquardt(
      state.damping, jnp.asarray(-jnp.inf, state.damping.dtype),
      factor=jnp.asarray(s.damping_factor, jnp.float32)
      ** jnp.asarray(s.damping_period, jnp.float32), lower=0.5, upper=1.5,
      min_damping=s.min_damping, max_damping=s.max_damping)
  new_z = jax.tree.map(
      lambda zi, di: jnp.where(take, p.rho * zi - p.beta * di,
                               jnp.where(undo, 0, zi)).astype(zi.dtype),
      z, p.delta)
  step = jax.tree.map(
      lambda zi, nzi: jnp.where(take, p.alpha * nzi,
                                jnp.where(undo, -state.last_step_scale * zi, 0)
                                ).astype(zi.dtype), z, new_z)
  kept = lambda new, old: jnp.where(p.finite, new, old)
  new_state = CurveBallState(
      z=new_z,
      damping=jnp.where(undo, raised, kept(p.damping.astype(jnp.float32),
                                            state.damping)),
      count=state.count + take.astype(state.count.dtype),
      loss=kept(lin.loss_value.astype(jnp.float32), state.loss),
      rho=kept(p.rho.astype(jnp.float32), state.rho),
      beta=kept(p.beta.astype(jnp.float32), state.beta),
      reduction_ratio=jnp.where(undo, -jnp.inf,
                                kept(p.reduction_ratio.astype(jnp.float32),
                                     state.reduction_ratio)),
      num_skipped=state.num_skipped + (~p.finite & ~undo).astype(state.num_skipped.dtype),
      # α of the update returned; a skipped batch keeps the record (nothing moved).
      last_step_scale=jnp.where(take, p.alpha.astype(jnp.float32),
                                jnp.where(p.finite | undo, 0.0, state.last_step_scale)),
      num_rolled_back=state.num_rolled_back + undo.astype(state.num_rolled_back.dtype))
  return step, new_state


def _coefficients(s: _Settings, model, count):
  """``(ρ, β)`` minimising the damped model over the coefficients not fixed.

  Both free: the 2×2 solve of eq. 19 (coefficients ``[−β, ρ]``). One fixed: the
  other's 1×1 solve with the fixed one's term moved into the linear part — the best
  value GIVEN the fixed one, not the joint optimum's.
  """
  if s.rho is None and s.beta is None:
    neg_beta, new_rho = quadratic.minimiser(model)  # eq. 19
    return new_rho, -neg_beta
  dtype = model.linear.dtype
  if s.rho is not None:  # minimise over x₀ = −β with x₁ = ρ fixed
    fixed, free = jnp.asarray(value_at(s.rho, count), dtype), 0
  else:  # minimise over x₁ = ρ with x₀ = −β fixed
    fixed, free = -jnp.asarray(value_at(s.beta, count), dtype), 1
  other = 1 - free
  line = quadratic.QuadraticModel(
      model.curvature[free:free + 1, free:free + 1],
      model.damped[free:free + 1, free:free + 1],
      model.linear[free:free + 1] + fixed * model.damped[free, other][None])
  (solved,) = quadratic.minimiser(line)
  return (solved, -fixed) if free == 1 else (fixed, -solved)


def _lambda_rule_due(s: _Settings, count):
  """Whether the λ rule runs on this step: counts ``0, T, 2T, …`` (§3.4, authors)."""
  if not s.lambda_rule:
    return jnp.asarray(False)
  every = jnp.maximum(jnp.asarray(s.damping_period, count.dtype), 1)
  return (count % every == 0) & (jnp.asarray(s.damping_period) > 0)


def _damping_rule(s: _Settings, state, lin, params, z, delta, coefficients, model_fn,
                  lam, due):
  """§3.4 as the authors run it: ``(λ, γ, accepted)`` for this step.

  On steps counted ``0, T, 2T, …``, ``γ = Δf / f̂`` with ``f̂`` the damped model at the
  step taken and ``Δf`` measured on this batch; a non-finite ``γ`` (a trial loss that
  is inf or NaN) rejects the step and grows ``λ`` as ``γ < 1/2`` does.
  """
  accepted = jnp.asarray(True)
  if not s.lambda_rule:
    return lam, state.reduction_ratio, accepted

  def evaluate(_):
    predicted = quadratic.predicted_change(model_fn(), coefficients, damped=True)
    step = jax.tree.map(
        lambda zi, di: (coefficients[1] * zi + coefficients[0] * di).astype(zi.dtype),
        z, delta)
    actual = (lin.loss_at(optax.tree.add(params, step)).astype(predicted.dtype)
              - lin.loss_value.astype(predicted.dtype))
    ratio = quadratic.reduction_ratio(actual, predicted)
    ok = jnp.isfinite(ratio)
    factor = (jnp.asarray(s.damping_factor, lam.dtype)
              ** jnp.asarray(s.damping_period, lam.dtype))
    new_lam = quadratic.levenberg_marquardt(
        lam, jnp.where(ok, ratio, -jnp.inf), factor=factor, lower=0.5, upper=1.5,
        min_damping=s.min_damping, max_damping=s.max_damping)
    return new_lam, ratio.astype(jnp.float32), ok

  def keep(_):
    return lam, state.reduction_ratio, accepted

  return jax.lax.cond(due, evaluate, keep, None)


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """``tree`` with each leaf in the dtype of ``like``'s (``z`` keeps the params' dtypes
  when the loss is computed in a wider one, e.g. bfloat16 params with a float32 loss)."""
  return jax.tree.map(lambda a, b: a.astype(b.dtype), tree, like)
