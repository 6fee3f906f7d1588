"""KFAC, KFLR and KFRA (Botev, Ritter & Barber, kfra_kflr.md) as optax transformations.

All three are one preconditioner over Kronecker-factored GGN blocks
``G̃_λ = Q̃_λ ⊗ 𝒢̃_λ`` (eq. 19–21) and differ only in the estimator of the output factor
``𝒢̃_λ`` (:mod:`curvax.kron.factors`): Monte-Carlo Fisher (KFAC), exact low rank (KFLR,
eq. 23–25) or the recursive approximation (KFRA, eq. 26 and Algorithm 1). One step, each
part a named stage of :mod:`curvax.kron.stages`:

1. capture the layers and linearise the network (one forward pass,
   :func:`curvax.kron.capture`); the gradient comes from the same pass;
2. estimate the factors, update their moving averages (decay 0.9: §5; every
   ``factor_period`` steps), and every
   ``inverse_period`` steps (and on γ-rule steps) their damped inverses
   (``jax.lax.cond`` on the count);
3. ``δ̃ = C̃⁻¹ ∇f`` with the factored damping ``(Q̃ + ω√k I) ⊗ (𝒢̃ + ω⁻¹√k I)``,
   ``k = γ + η`` (eq. 33–38);
4. ``δ* = α* δ̃`` with ``α* = −δ̃ᵀ∇f / (δ̃ᵀ G δ̃ + (τ + η)‖δ̃‖²)`` (eq. 39–41), where
   ``δ̃ᵀ G δ̃ = (J δ̃)ᵀ H_L (J δ̃)`` is the full GGN of the batch: ONE J-product. With
   momentum (the default) the step is ``α δ̃ + μ δ_prev`` with ``(α, μ)`` minimising the
   same model (the 2×2 solve of Martens & Grosse §7) subject to ``0 ≤ μ ≤ 1``; both
   come from :mod:`curvax.quadratic`;
5. every ``tau_period`` steps the Levenberg-Marquardt rule on
   ``ρ = (f(θ + δ*) − f(θ)) / (f̂(δ*) − f̂(0))`` (eq. 42): ``τ·ω_τ`` if ``ρ > 0.75``,
   ``τ/ω_τ`` if ``ρ < 0.75``, ``ω_τ = 0.95^{T_τ}`` (App. C.3.1) — one extra forward pass
   on those steps. A step whose trial loss ``f(θ + δ*)`` is not finite is rejected
   (not applied) and ``τ`` grows as for ``ρ < 0.75`` (see :class:`KFACState`); the γ
   rule needs no such guard: it evaluates only the quadratic model, and a candidate
   with a non-finite model value is never chosen;
6. every ``gamma_period`` steps the greedy γ rule (App. C.3.2): the inverses and the
   step are computed for each of ``{ω_γ γ, γ, γ/ω_γ}`` (``ω_γ = 0.95^{T_γ}``) and the
   ``γ`` whose ``δ*`` minimises the quadratic model ``f̂(δ*)`` — the full-GGN model of
   step 4 — is kept with its inverses (two more J-products on those steps). The rule
   runs on the first step of every period (counts ``0, T_γ, 2T_γ, …``), which are
   inverse-refresh steps when ``T_γ`` is a multiple of ``inverse_period``: the chosen
   inverses are that step's refresh, so the rule adds two inverse sets, not three.

``η`` is an L2 regulariser ``(η/2)‖θ‖²`` added to the objective (App. C), 0 by default.
The quadratic model of steps 4–6 is ``f̂(δ) = ∇fᵀδ + ½ δᵀ(G + (τ + η)I)δ``.

Deviations and choices (see also docs/api/kfac.md):

* the defaults are chosen by measurement on the shipped problems
  (``benchmarks/defaults.py``, ``benchmarks/results/defaults_kfac.json``): momentum on,
  inverses every 5 steps, initial ``γ = 3·10⁻⁴``, ``τ = 3·10⁻²`` and ``τ`` kept at or
  above ``min_tau = 3·10⁻²`` (``benchmarks/results/kron_damping_defaults.json``: without
  the floor the τ rule drives ``τ`` to ``min_damping`` on small or noisy batches and the
  steps grow without bound along flat directions). Algorithm 1 as written
  (inverses every step, no momentum: §5 found momentum unstable) is
  ``**KRON_PAPER_SETTINGS``, which stalls on the MNIST autoencoder's plateau (loss ≈ 206)
  where the defaults leave it;
* ``μ`` is constrained to ``[0, 1]`` (``momentum_bounds``; Martens & Grosse solve the
  2×2 system freely). After a step that overshoots — the ReLU CNN's first step with
  small damping — the free solve asks to reverse the last step several times over
  (``μ ≈ −3.5``, then ``−58``, ``−10⁷``: a growing oscillation that ends in overflow);
  bounded, ``μ = 0`` there and the step is the plain ``α δ̃``;
* the damped inverses (two positive-definite inversions per layer, App. C.1; see
  :mod:`curvax.kron.inverse`) are kept in the state and refreshed every
  ``inverse_period`` steps and on γ-rule steps, as in KFAC (Algorithm 1 refreshes them
  every step);
* the reduction ratio of eq. 42 uses the damped model ``G + (τ + η)I``, as written in
  App. C.3.1 (KFAC's §6.5 leaves ``τ`` out);
* the scale and offset of a LayerNorm / RMSNorm and every vector parameter no captured
  layer uses (a standalone bias) get a full GGN block ``(F + kI)⁻¹``
  (:mod:`curvax.kron.full_blocks`; KFAC and KFLR); what is left (a weight under
  ``nn.scan``, a transformed or tied weight, a block above ``max_factor_dim``) gets a
  diagonal GGN estimate (``fallback="diagonal"``) or the identity, and a warning names
  exactly those parameters. KFRA refuses all of these: its recursion covers chains of
  Dense layers only.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvax import damping as damping_lib
from curvax import kron
from curvax import losses as losses_lib
from curvax import nonfinite
from curvax._validation import (ScalarOrSchedule, check_fraction, check_in_range,
                                check_integer, check_positive, check_within, concrete_value,
                                static_fraction)
from curvax.kron import stages
from curvax.kron import state as kron_state

PyTree = Any


class KFACState(NamedTuple):
  """State of :func:`kfac`, :func:`kflr` and :func:`kfra`.

  Attributes:
    factors: moving averages of ``Q̃``, ``𝒢̃`` and the fallback diagonals, per leaf.
    inverse: the factors' representation: their damped inverses for the current
      ``γ`` (``inverse="cholesky"``), refreshed every ``inverse_period`` steps and on
      γ-rule steps; or their eigenbases (:class:`curvax.kron.eigen.Eigenbasis`),
      refreshed every ``inverse_period`` steps; for :func:`ekfac`, the eigenbases
      and the diagonal re-estimated in them (:class:`curvax.kron.ekfac.Corrected`).
    velocity: the last step applied to the parameters, in the parameters' dtypes
      (zero at ``init`` and after a rollback): ``δ_prev`` of the momentum term
      (``momentum=True``) and what a rollback reverses.
    gamma: ``γ``, the damping of the approximate curvature (App. C.3.2).
    tau: ``τ``, the damping of the full-GGN quadratic model (App. C.3.1).
    count: batches processed (finite batches only); the periodic rules and the
      schedules run on it.
    loss: the loss at the parameters the step started from (free: from its own
      forward pass; without the L2 term).
    alpha, mu: the coefficients of ``δ̃`` and ``δ_prev`` in the last step computed.
    reduction_ratio: the last ``ρ`` of the τ rule (NaN before the first; ``−∞`` for a
      rejected step).
    num_skipped: batches whose loss, factors or step were not finite; such a batch
      leaves parameters and every other field unchanged (so every periodic schedule —
      τ rule, γ rule, inverse refreshes, hyperparameter schedules — runs one batch
      later), except that on an inverse-refresh step the freshly computed inverses may
      stay (the count does not advance, so the next step computes them again before
      they are used).
    num_rejected: steps rejected by the τ rule because the loss at ``θ + δ*`` was not
      finite. A rejected step is a processed batch whose step is not taken: the update
      is zero; ``τ`` grows as for ``ρ < 0.75`` (``τ/ω_τ``, clipped) and ``ρ`` is
      recorded as ``−∞``; ``velocity`` keeps the last step actually applied (the next
      2×2 solve re-fits ``μ`` under the larger ``τ``; a zero velocity would drop the
      momentum direction); everything else — the count, the factors (the batch was
      finite), the inverses, ``γ`` (chosen on the quadratic model, which was finite),
      ``loss``, ``alpha`` and ``mu`` — advances as on an accepted step.
    num_rolled_back: batches not finite at the current parameters whose loss and
      gradient were finite before the last applied step (``velocity``): that step
      landed where the loss overflows, so the update returned is ``−velocity``, ``τ``
      grows as for a rejected step, ``velocity`` is cleared (so a second consecutive
      non-finite batch is skipped) and everything else stays as it was
      (:mod:`curvax.nonfinite`).
  """
  factors: kron_state.Factors
  inverse: Any  # kron_state.Inverse, kron.eigen.Eigenbasis or kron.ekfac.Corrected
  velocity: Optional[PyTree]
  gamma: jax.Array
  tau: jax.Array
  count: jax.Array
  loss: jax.Array
  alpha: jax.Array
  mu: jax.Array
  reduction_ratio: jax.Array
  num_skipped: jax.Array
  num_rejected: jax.Array
  num_rolled_back: jax.Array


def kronecker_factored(loss: "losses_lib.Loss | str",
                       estimator: Callable[[kron.Capture, jax.Array], kron.Estimate], *,
                       name: str = "kronecker_factored",
                       learning_rate: ScalarOrSchedule = 1.0, gamma: float = 3e-4,
                       tau: float = 3e-2, weight_decay: ScalarOrSchedule = 0.0,
                       factor_decay: ScalarOrSchedule = 0.9, factor_period: int = 1,
                       inverse_period: int = 5,
                       tau_period: int = 5, tau_factor: Optional[float] = None,
                       gamma_period: int = 20, gamma_factor: Optional[float] = None,
                       min_damping: ScalarOrSchedule = 1e-8,
                       max_damping: ScalarOrSchedule = 1e8,
                       min_tau: ScalarOrSchedule = 3e-2,
                       momentum: bool = True,
                       momentum_bounds: Optional[tuple[float, float]] = (0.0, 1.0),
                       fallback: str = "diagonal",
                       max_factor_dim: Optional[int] = 4096, seed: int = 0,
                       axis_name: Optional[str] = None,
                       curvature_fraction: Optional[float] = None,
                       inverse: "str | stages.Representation" = "cholesky"
                       ) -> optax.GradientTransformationExtraArgs:
  """The shared optimiser behind :func:`kfac`, :func:`kflr` and :func:`kfra`.

  ``estimator(capture, key) -> kron.Estimate`` gives one batch's factors; see
  :func:`kfac` for the other arguments. The step is the pipeline of
  :mod:`curvax.kron.stages`.
  """
  loss = losses_lib.get(loss)
  settings = _settings(
      name, learning_rate=learning_rate, gamma=gamma, tau=tau, weight_decay=weight_decay,
      factor_decay=factor_decay, factor_period=factor_period,
      inverse_period=inverse_period, tau_period=tau_period, tau_factor=tau_factor,
      gamma_period=gamma_period, gamma_factor=gamma_factor, min_damping=min_damping,
      max_damping=max_damping, min_tau=min_tau, momentum=momentum,
      momentum_bounds=momentum_bounds, fallback=fallback, max_factor_dim=max_factor_dim,
      seed=seed, axis_name=axis_name, curvature_fraction=curvature_fraction)
  representation = _representation(name, inverse)

  def init_fn(params):
    factors, rep = representation.init(params,
                                       max_factor_dim=_known_dim(name, max_factor_dim))
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    # One buffer per leaf: a state donated to a jitted step may not alias a buffer.
    zero = lambda: jnp.zeros((), jnp.int32)
    return KFACState(
        factors=factors, inverse=rep,
        velocity=optax.tree.zeros_like(params),
        gamma=f32(gamma), tau=f32(tau), count=zero(), loss=f32(jnp.nan),
        alpha=f32(0.0), mu=f32(0.0), reduction_ratio=f32(jnp.nan),
        num_skipped=zero(), num_rejected=zero(), num_rolled_back=zero())

  def update_fn(updates, state, params=None, *, predict_fn=None, targets=None,
                linearization=None, curvature_predict_fn=None, curvature_targets=None,
                **extra_args):
    del extra_args  # Other transforms' arguments in an optax.chain.
    if params is None:
      raise ValueError(f"{name}: params are required: call tx.update(updates, state, "
                       "params, predict_fn=..., targets=...).")
    ctx = stages.make_context(settings, loss, state.factors, state.count, updates, params,
                              predict_fn=predict_fn, targets=targets,
                              linearization=linearization,
                              curvature_predict_fn=curvature_predict_fn,
                              curvature_targets=curvature_targets)
    factors, accept, stored = stages.estimate_and_represent(
        ctx, settings, estimator, representation, state.factors, state.inverse)
    tau_now = state.tau.astype(ctx.dtype)
    model_damping = tau_now + ctx.decay
    moment = stages.momentum_terms(ctx, state.velocity) if momentum else None
    chosen = stages.choose_gamma(ctx, settings, representation, factors, stored,
                                 state.gamma.astype(ctx.dtype), moment, model_damping)
    rate = ctx.at_count(learning_rate)
    # The step in the parameters' dtypes (the coefficients are float32 or wider).
    step = jax.tree.map(lambda s, p: (rate * s).astype(p.dtype), chosen.step, params)
    new_tau, ratio, taken = stages.tau_rule(ctx, settings, state.reduction_ratio, step,
                                            rate * chosen.image, model_damping, tau_now)
    return _finish(state, ctx, factors, accept, chosen, step, new_tau, ratio, taken,
                   settings)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _representation(name: str, inverse) -> stages.Representation:
  """The :class:`curvax.kron.stages.Representation` named by ``inverse`` (or given)."""
  if isinstance(inverse, stages.Representation):
    return inverse
  if inverse in stages.REPRESENTATIONS:
    return stages.REPRESENTATIONS[inverse]
  raise ValueError(f"{name}: inverse must be one of "
                   f"{sorted(stages.REPRESENTATIONS)}, got {inverse!r}.")


def _known_dim(name: str, max_factor_dim) -> Optional[int]:
  """``max_factor_dim`` as an int (``None`` stays): it sets the state's shapes."""
  if max_factor_dim is None:
    return None
  dims = concrete_value(max_factor_dim)
  if dims is None:
    raise ValueError(f"{name}: max_factor_dim sets the state's shapes and must be "
                     "known when init runs (not traced).")
  return int(dims)


def _finish(state: KFACState, ctx: stages.Context, factors, accept, chosen: stages.Candidate,
            step, new_tau, ratio, taken, settings: stages.Settings):
  """Stage 7: the next state, and the non-finite guard over step and state (a skip,
  or the rollback of a landing: see :class:`KFACState`)."""
  # The representation needs no check of its own: a non-finite entry makes the step
  # non-finite (every entry multiplies the gradient block, and NaN·0 = NaN).
  finite = accept & nonfinite.all_finite(step, chosen.alpha, chosen.mu)
  velocity = step
  num_rejected = state.num_rejected
  if taken is not True:  # the τ rule may reject the step: see KFACState
    step = optax.tree.where(taken, step, optax.tree.zeros_like(step))
    velocity = optax.tree.where(taken, velocity, state.velocity)
    num_rejected = num_rejected + jnp.where(taken, 0, 1).astype(num_rejected.dtype)
  f32 = lambda v: v.astype(jnp.float32)
  # A landing can leave the batch's loss and factor estimate finite but huge (1e29 for a
  # ReLU network's squared error) while the step overflows: the factors and their
  # representation then come back from before the batch, or a rollback would keep them
  # and every later step would overflow on them. A cond (one branch's buffers), not a
  # select pass over every factor.
  factors, representation = jax.lax.cond(
      finite, lambda: (factors, chosen.representation),
      lambda: (state.factors, state.inverse))
  new_state = KFACState(
      factors=factors, inverse=representation, velocity=velocity,
      gamma=f32(chosen.gamma), tau=f32(new_tau), count=state.count + 1,
      loss=f32(ctx.loss_value), alpha=f32(chosen.alpha), mu=f32(chosen.mu),
      reduction_ratio=f32(ratio), num_skipped=state.num_skipped,
      num_rejected=num_rejected, num_rolled_back=state.num_rolled_back)
  # Neither the factors nor the representation need the guard's select: they were
  # chosen above.
  raised = damping_lib.tau_rule(
      state.tau.astype(ctx.dtype), jnp.asarray(-jnp.inf, ctx.dtype),
      factor=jnp.asarray(settings.tau_factor, ctx.dtype),
      min_tau=stages.tau_floor(ctx, settings), max_tau=ctx.bounds[1])
  undo = nonfinite.Rollback(
      due=nonfinite.rollback_due(finite, ctx.params, state.velocity, ctx.loss_at),
      step=nonfinite.reverse(state.velocity),
      state=state._replace(tau=f32(raised),
                           velocity=optax.tree.zeros_like(state.velocity)))
  return nonfinite.guard(finite, step, new_state, state,
                         unguarded=("factors", "inverse"), rollback=undo)


def _settings(name: str, *, learning_rate, gamma, tau, weight_decay, factor_decay,
              factor_period, inverse_period, tau_period, tau_factor, gamma_period,
              gamma_factor, min_damping, max_damping, min_tau, momentum, momentum_bounds,
              fallback, max_factor_dim, seed, axis_name,
              curvature_fraction) -> stages.Settings:
  """Validates :func:`kronecker_factored`'s arguments (clear errors at build time, for
  every value known then) into :class:`curvax.kron.stages.Settings`."""
  label = lambda arg: f"{name}: {arg}"
  check_positive(label("learning_rate"), learning_rate, schedule=True)
  check_positive(label("gamma"), gamma)
  check_positive(label("tau"), tau)
  check_in_range(label("weight_decay"), weight_decay, 0.0, math.inf, schedule=True)
  check_in_range(label("factor_decay"), factor_decay, 0.0, 1.0, schedule=True)
  if concrete_value(factor_decay) == 1.0:
    raise ValueError(f"{name}: factor_decay must lie in [0, 1), got {factor_decay!r}.")
  check_integer(f"{name}: factor_period", factor_period, 1)
  check_integer(f"{name}: inverse_period", inverse_period, 1)
  momentum_bounds = _check_momentum_bounds(name, momentum_bounds)
  check_integer(f"{name}: tau_period", tau_period, 0)
  check_integer(f"{name}: gamma_period", gamma_period, 0)
  check_integer(f"{name}: seed", seed, -2**31)
  tau_factor = damping_lib.period_factor(tau_period) if tau_factor is None else tau_factor
  gamma_factor = (damping_lib.period_factor(gamma_period) if gamma_factor is None
                  else gamma_factor)
  check_fraction(label("tau_factor"), tau_factor)
  check_fraction(label("gamma_factor"), gamma_factor)
  check_positive(label("min_damping"), min_damping, schedule=True)
  check_positive(label("max_damping"), max_damping, schedule=True)
  check_within(label("gamma"), gamma, min_damping, max_damping)
  check_in_range(label("min_tau"), min_tau, 0.0, math.inf, schedule=True)
  check_within(label("tau"), tau, min_damping, max_damping)
  low, high = concrete_value(min_damping), concrete_value(max_damping)
  if low is not None and high is not None and low > high:
    raise ValueError(f"{name}: min_damping={min_damping} exceeds "
                     f"max_damping={max_damping}.")
  if fallback not in ("diagonal", "identity"):
    raise ValueError(f"{name}: fallback must be 'diagonal' or 'identity', got "
                     f"{fallback!r}.")
  if max_factor_dim is not None:
    # Only init reads it (the update reads the slots from the state's shapes), so an
    # injected, traced value is fine there.
    check_integer(f"{name}: max_factor_dim", max_factor_dim, 2)
  fraction = static_fraction(
      name, 1.0 if curvature_fraction is None else curvature_fraction, "curvature_fraction")
  return stages.Settings(
      name=name, learning_rate=learning_rate, weight_decay=weight_decay,
      # A weight decay known to be 0 drops its terms from the step; any other (an
      # array, a schedule, a traced value) keeps them.
      decays=concrete_value(weight_decay) != 0, factor_decay=factor_decay,
      factor_period=factor_period, inverse_period=inverse_period, tau_period=tau_period,
      tau_factor=tau_factor, gamma_period=gamma_period, gamma_factor=gamma_factor,
      min_damping=min_damping, max_damping=max_damping, min_tau=min_tau,
      momentum=momentum, momentum_bounds=momentum_bounds, fallback=fallback, seed=seed,
      axis_name=axis_name, curvature_fraction=fraction)


_COMMON_ARGS = """
    loss: a :class:`curvax.losses.Loss` or its name.
    learning_rate: scales ``δ*`` (1: the optimum of the quadratic model, eq. 40). A
      number or an ``optax.Schedule`` of the step count.
    gamma: initial ``γ``, the damping of the Kronecker-factored curvature (eq. 35).
    tau: initial ``τ``, the damping of the full-GGN model that sets the step size
      (eq. 41). ``γ`` and ``τ`` are read by ``init`` only (the rules adapt them in the
      state): a number or an array, not a schedule.
    weight_decay: ``η``, an L2 term ``(η/2)‖θ‖²`` added to the objective; it enters the
      gradient, ``k = γ + η`` and the model's ``τ + η`` (App. C). A number or a
      schedule.
    factor_decay: moving-average decay of the factors (§5: 0.9; 0 uses the batch
      alone). A number or a schedule.
    factor_period: update the factors' moving averages every this many steps, on
      counts ``0, T, 2T, …`` (kfac-jax's ``curvature_update_period``); in between the
      estimator's passes (KFAC's sampled backward pass, the factor products) are
      skipped. ``factor_decay`` applies per update. Default 1 (every step, §5).
    inverse_period: recompute the factors' damped inverses (or eigenbases) every this
      many steps (Algorithm 1: every step; Martens & Grosse use 20; default 5, by
      measurement).
    inverse: how the damped factors are applied (:mod:`curvax.kron.eigen`):
      ``"cholesky"`` (default): Cholesky inverses of ``Q̃ + ω√k I`` and
      ``𝒢̃ + ω⁻¹√k I`` (eq. 36–38, App. C.1), made anew for each γ candidate;
      ``"eigh"``: the same factored damping applied in the factors' eigenbases, which
      serve every γ (one ``eigh`` per factor per ``inverse_period``, none extra on
      γ-rule steps; four products per block per step instead of two);
      ``"eigh_exact"``: the exact Tikhonov damping ``(Q̃ ⊗ 𝒢̃ + kI)⁻¹`` (eq. 35) in
      the eigenbases.
    tau_period: ``T_τ`` of the τ rule (App. C.3.1: 5); 0 keeps ``τ`` fixed. A step
      whose trial loss ``f(θ + δ*)`` is not finite is rejected (see :class:`KFACState`).
    tau_factor: ``ω_τ``; default ``0.95^{T_τ}``.
    gamma_period: ``T_γ`` of the greedy γ rule (App. C.3.2: 20), applied on steps
      ``0, T_γ, 2T_γ, …``; 0 keeps ``γ`` fixed.
    gamma_factor: ``ω_γ``; default ``0.95^{T_γ}``.
    min_damping, max_damping: bounds for ``γ`` and ``τ`` (numbers or schedules).
    min_tau: a floor on the ``τ`` the τ rule sets (a number or a schedule; the larger
      of it and ``min_damping`` holds; an initial ``tau`` below it is used until the
      first τ update). Measured default ``3·10⁻²``
      (``benchmarks/results/kron_damping_defaults.json``): ρ is computed on the batch
      the step was fitted to, so it stays near 1, the τ rule shrinks ``τ`` to
      ``min_damping`` and ``‖δ*‖ ≤ ‖∇f‖/τ`` stops bounding steps along flat directions —
      the small transformer went from loss 6.0 to 6·10¹³ in 16 steps and the CNN at
      batch 32 from 2.3 up; with the floor both descend (3.33, 0.41). Cost: the paper's
      autoencoder reaches 91.1 instead of 77.1 in 110 steps. The paper has no floor
      (``min_tau=0``, in ``KRON_PAPER_SETTINGS``).
    momentum: add KFAC's momentum ``μ δ_prev`` (Martens & Grosse §7) with ``(α, μ)``
      from a 2×2 quadratic-model solve. On by default, chosen by measurement (see the
      module docstring); kfra_kflr.md §5 found no benefit (``KRON_PAPER_SETTINGS``).
    momentum_bounds: ``(low, high)`` for ``μ``: the model is minimised with ``μ`` in
      this interval (the free 2×2 solve when it lies inside; otherwise ``μ`` at the
      nearer bound and ``α`` re-optimised, :func:`curvax.quadratic.minimiser_bounded`).
      ``None``: the unconstrained solve of Martens & Grosse. Ignored without momentum.
    fallback: curvature block of the parameters that have neither a Kronecker block
      (kernels and their biases) nor a full block (LayerNorm / RMSNorm scales and
      offsets, vectors no captured layer uses): ``"diagonal"`` (a GGN-diagonal estimate
      from the estimator's own backward pass) or ``"identity"``. A warning names them.
    max_factor_dim: kernels whose factors, and full blocks that would be larger than
      this (and every leaf with more axes that is no kernel) use the fallback; also
      bounds the state allocated for leaves that turn out not to be kernels (e.g.
      embedding tables). A full block of ``d`` features costs ``2d²`` numbers (block
      and inverse; ``8d²`` for a LayerNorm's joint scale-offset block). ``None``: no
      bound.
    seed: PRNG seed of the estimator's random numbers (folded with the step count).
    curvature_fraction: estimate the curvature on the first ``⌈f·B⌉`` examples of the
      batch (tensorflow/kfac sub-samples 20 %; Martens' HF takes its curvature on a
      smaller batch than its gradient): the factors (KFAC's sampled backward pass
      included), the J-products of the α/μ model and the γ rule, and the τ rule's ρ
      (its trial loss and model change on the same examples); the gradient stays the
      whole batch's. The network runs twice — on the sub-batch, linearised with its
      layers captured, and on the batch for ``value_and_grad``. Flax linen models only
      (the root module's batch-major inputs are cut); otherwise pass the sub-batch as
      ``curvature_predict_fn=`` / ``curvature_targets=`` extra arguments to ``update``
      (which also work with a fraction of 1). ``None``: 1, the whole batch (not a
      number by default, so that ``optax.inject_hyperparams`` leaves it static).
    axis_name: data-parallel axis (``shard_map`` / ``pmap``) the batch is split over,
      evenly: the gradient, the factors (each an average over examples), the quadratic
      model and ρ are averaged over it (:meth:`curvax.Linearization.batch_mean`), so
      every device takes the global-batch step. KFAC samples its targets with a key
      folded with the device index. Not needed under ``jax.jit`` with a sharded batch.
"""

_USAGE = """
  Use as ``tx.update(grads_or_None, state, params, predict_fn=..., targets=...)`` with
  ``predict_fn(params) -> outputs`` the network on the current batch (or
  ``linearization=`` from :func:`curvax.linearize`, whose network and targets are
  re-run with the layers captured). Pass ``None`` for the updates: the gradient comes
  from the step's own forward pass; a given gradient (e.g. after
  ``optax.add_decayed_weights``) is used instead. Flax linen ``nn.Dense``,
  ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed``, ``nn.LayerNorm`` and ``nn.RMSNorm``
  layers are found automatically; in pure JAX or ``flax.nnx`` code mark layers with
  :func:`curvax.kron.dense` (see :mod:`curvax.kron.capture`).

  Numeric hyperparameters may be Python/NumPy numbers or 0-d JAX arrays (validated when
  their value is known), so ``optax.inject_hyperparams`` works; schedules are evaluated
  at the state's ``count`` (finite batches). The integer arguments may be injected too,
  except ``num_samples``, which sets array shapes.
"""

# The keyword arguments every public Kronecker-factored solver takes, from the one
# function that implements them (``loss`` is each solver's own first argument).
_COMMON_PARAMETERS = tuple(
    p for p in inspect.signature(kronecker_factored).parameters.values()
    if p.name not in ("loss", "estimator", "name"))
_COMMON_NAMES = frozenset(p.name for p in _COMMON_PARAMETERS)


def _documented(fn):
  """Fills in the shared docstring parts and gives ``fn`` its full signature: its own
  parameters and the common ones it takes through ``**kwargs``. ``inspect.signature``
  — hence ``optax.inject_hyperparams``, which binds the arguments to the signature and
  injects each numeric one — then sees every hyperparameter by name."""
  fn.__doc__ = fn.__doc__.replace("{usage}", _USAGE.strip()).replace(
      "{common}", _COMMON_ARGS.rstrip()).replace("{weight_sharing}", _WEIGHT_SHARING_DOC)
  own = [p for p in inspect.signature(fn).parameters.values()
         if p.kind is not inspect.Parameter.VAR_KEYWORD]
  fn.__signature__ = inspect.signature(fn).replace(
      parameters=own + list(_COMMON_PARAMETERS))
  return fn


def _common(solver: str, kwargs: dict, own: Sequence[str] = ()) -> dict:
  """``kwargs`` if every name is a common argument; else a ``TypeError`` naming the
  solver (``damping`` / ``lambda`` get pointed to ``gamma`` and ``tau``)."""
  unknown = sorted(set(kwargs) - _COMMON_NAMES)
  if unknown:
    hints = []
    for arg in unknown:
      if "damp" in arg or arg in ("lambda_", "lam", "lmbda", "l2_reg"):
        hints.append(f"{arg!r}: the damping is gamma= (initial γ, of the "
                     "Kronecker-factored curvature, App. C.3.2) and tau= (initial τ, of "
                     "the full-GGN model "
                     "that sets the step size, App. C.3.1), bounded by min_damping= and "
                     "max_damping=")
      else:
        close = difflib.get_close_matches(arg, sorted(_COMMON_NAMES | set(own)), n=1)
        hints.append(f"{arg!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    names = ", ".join(["loss", *own, *sorted(_COMMON_NAMES)])
    raise TypeError(f"{solver}() got unexpected keyword argument(s): " + "; ".join(hints)
                    + f". Its arguments: {names}.")
  return kwargs


_WEIGHT_SHARING_DOC = """weight_sharing: how a kernel applied at several positions of an example
      (a sequence, an image's patches, several calls) forms its factors (Eschenhagen et
      al. 2023): ``"expand"`` (default) treats every position as an example; ``"reduce"``
      averages the inputs and sums the output sensitivities over an example's positions
      first (exact for networks that pool the shared axis before the output, and
      cheaper: one row per example). See :func:`curvax.kron.factors.from_columns`."""


def _check_momentum_bounds(solver: str, bounds) -> Optional[tuple[float, float]]:
  if bounds is None:
    return None
  try:
    low, high = (float(b) for b in bounds)
  except (TypeError, ValueError):
    raise ValueError(f"{solver}: momentum_bounds must be None or a pair (low, high) of "
                     f"numbers, got {bounds!r}.") from None
  if not low <= high or math.isnan(low) or math.isnan(high):
    raise ValueError(f"{solver}: momentum_bounds needs low <= high, got {bounds!r}.")
  return low, high


# Algorithm 1 of kfra_kflr.md as written: inverses every step, no momentum on the updates
# (§5). ``curvax.kfac(loss, **curvax.KRON_PAPER_SETTINGS)``; see the module docstring.
KRON_PAPER_SETTINGS = {"inverse_period": 1, "momentum": False, "min_tau": 0.0}


def _check_weight_sharing(solver: str, weight_sharing: str) -> str:
  if weight_sharing not in kron.capture_lib.WEIGHT_SHARING:
    raise ValueError(f"{solver}: weight_sharing must be one of "
                     f"{kron.capture_lib.WEIGHT_SHARING}, got {weight_sharing!r}.")
  return weight_sharing


def _fisher_estimator(solver: str, loss, num_samples, weight_sharing: str, kwargs: dict):
  """KFAC's Monte-Carlo estimator ``(capture, key, examples=False) -> Estimate``, its
  arguments validated."""
  _check_weight_sharing(solver, weight_sharing)
  if num_samples is None:
    num_samples = 1
  if isinstance(num_samples, jax.core.Tracer):
    raise ValueError(f"{solver}: num_samples sets array shapes and cannot be traced; "
                     "with optax.inject_hyperparams pass static_args='num_samples'.")
  if (isinstance(num_samples, (bool, np.bool_)) or concrete_value(num_samples) is None
      or concrete_value(num_samples) < 1 or concrete_value(num_samples) % 1):
    raise ValueError(f"{solver}: num_samples must be an integer >= 1, got "
                     f"{num_samples!r}.")
  num_samples = int(concrete_value(num_samples))
  if losses_lib.get(loss).per_example_sample is None:
    raise ValueError(
        f"{solver}: the loss {losses_lib.get(loss).name!r} defines no predictive "
        "distribution to sample targets from; build it with sample_fn= "
        "(curvax.losses.from_fn) or use curvax.kflr / curvax.kfra.")
  fallback_diagonal = kwargs.get("fallback", "diagonal") == "diagonal"
  return lambda cap, key, examples=False: kron.kfac_factors(
      cap, key, num_samples=num_samples, fallback_diagonal=fallback_diagonal,
      weight_sharing=weight_sharing, examples=examples)


def _ggn_estimator(solver: str, weight_sharing: str, max_columns, kwargs: dict):
  """KFLR's exact estimator ``(capture, key, examples=False) -> Estimate``, its
  arguments validated."""
  _check_weight_sharing(solver, weight_sharing)
  if max_columns is None:
    max_columns = 4096
  if concrete_value(max_columns) is None:
    raise ValueError(f"{solver}: max_columns is a trace-time limit and cannot be "
                     "traced; with optax.inject_hyperparams pass static_args='max_columns'.")
  check_positive(f"{solver}: max_columns", max_columns)
  fallback_diagonal = kwargs.get("fallback", "diagonal") == "diagonal"

  def estimator(cap, key, examples=False):
    columns = math.prod(cap.lin.outputs.shape[1:])  # K = D for every curvax loss
    if columns > max_columns:
      raise ValueError(
          f"{solver}: this model has K = {columns} output columns per example "
          f"(outputs of shape {tuple(cap.lin.outputs.shape)}: classes × positions), more "
          f"than max_columns={max_columns}; a step costs about K backward passes "
          "and K copies of every layer's sensitivities. Use curvax.kfac (one sampled "
          "column) or raise max_columns.")
    return kron.kflr_factors(cap, key, fallback_diagonal=fallback_diagonal,
                             weight_sharing=weight_sharing, examples=examples)
  return estimator


@_documented
def kfac(loss: "losses_lib.Loss | str", *, num_samples: Optional[int] = None,
         weight_sharing: str = "expand",
         **kwargs) -> optax.GradientTransformationExtraArgs:
  """KFAC (Martens & Grosse 2015) in kfra_kflr.md's formulation (App. D.3).

  ``𝒢̃_λ`` is the Monte-Carlo Fisher: targets sampled from the model's predictive
  distribution (``loss.sample``), pulled back to every layer in one backward pass per
  sample. For the exponential-family losses it equals KFLR's exact ``E[𝒢_λ]`` in
  expectation. Dense, Conv (KFC) and embedding layers; full blocks for normalisation
  layers and lone vectors (:mod:`curvax.kron.full_blocks`).
  {usage}

  Args:
    num_samples: Monte-Carlo samples of the targets per step (``None``: 1 — not a
      number by default, so that ``optax.inject_hyperparams`` leaves it static).
    {weight_sharing}{common}"""
  kwargs = _common("curvax.kfac", kwargs, own=("num_samples", "weight_sharing"))
  estimator = _fisher_estimator("curvax.kfac", loss, num_samples, weight_sharing, kwargs)
  return kronecker_factored(loss, estimator, name="curvax.kfac", **kwargs)


@_documented
def kflr(loss: "losses_lib.Loss | str", *, weight_sharing: str = "expand",
         max_columns: Optional[float] = None,
         **kwargs) -> optax.GradientTransformationExtraArgs:
  """KFLR: Kronecker-factored GGN with the exact ``E[𝒢_λ]`` (kfra_kflr.md §3.4).

  The ``K`` columns of ``loss.hessian_sqrt`` (``K`` = outputs per example: classes ×
  positions, e.g. vocabulary × sequence length for a language model) are pulled back
  to every layer with one vmapped backward pass (eq. 23–25): a step costs about ``K``
  backward passes and holds ``K`` copies of every layer's sensitivities, so KFLR is
  meant for few outputs (classifiers); :func:`kfac` samples one column instead.
  {usage}

  Args:
    {weight_sharing}
    max_columns: refuse (at trace time) models with more than this many columns ``K``
      per example (``None``: 4096 — not a number by default, so that
      ``optax.inject_hyperparams`` leaves it static; ``math.inf``: no limit).{common}"""
  kwargs = _common("curvax.kflr", kwargs, own=("weight_sharing", "max_columns"))
  estimator = _ggn_estimator("curvax.kflr", weight_sharing, max_columns, kwargs)
  return kronecker_factored(loss, estimator, name="curvax.kflr", **kwargs)


@_documented
def kfra(loss: "losses_lib.Loss | str", *,
         activations: Union[Callable, Sequence[Optional[Callable]], None] = None,
         check_chain: bool = True, **kwargs) -> optax.GradientTransformationExtraArgs:
  """KFRA: Kronecker-factored GGN by the recursive approximation (kfra_kflr.md §3.5).

  ``𝒢̃`` is passed backwards through the network as an expected matrix,
  ``𝒢̃_{λ−1} = (W_λᵀ 𝒢̃_λ W_λ) ⊙ (1/B) Σ A′A′ᵀ`` (eq. 26, Algorithm 1) — no per-example
  backward passes, so it suits many outputs (autoencoders). It needs a chain of Dense
  layers with elementwise activations whose last output is the network output; the
  activations are declared, and a model that is not such a chain is an error (trace
  time for structure, run time for values when ``check_chain``).
  {usage}

  Args:
    activations: the elementwise function between consecutive Dense layers: one
      callable for every gap, or a sequence with one entry per gap (``None`` = linear).
      :func:`curvax.kron.chain_activations` gives them for curvax's MLP and autoencoder.
      Under ``optax.inject_hyperparams`` a single callable must be named in
      ``static_args`` (optax takes callables for schedules); a list needs nothing.
    check_chain: verify at every step (cheaply, from the captured activations) that the
      model computed ``a_λ = f_λ(h_λ)`` and output ``h_L``; a mismatch raises.{common}"""
  if activations is None:
    raise ValueError(
        "curvax.kfra: activations= is required: the elementwise function between "
        "consecutive Dense layers (one callable, or one per gap with None for linear); "
        "curvax.kron.chain_activations(model) gives them for curvax.problems.models.MLP "
        "and Autoencoder.")
  kwargs = _common("curvax.kfra", kwargs, own=("activations", "check_chain"))
  if not callable(activations):
    if isinstance(activations, (jax.Array, np.ndarray, float, int)):
      raise TypeError(
          "curvax.kfra: activations must be a callable or a sequence of callables/None, "
          f"got the number {activations!r} (optax.inject_hyperparams treats a callable "
          "as a schedule: pass static_args='activations', or a list).")
    activations = tuple(activations)
    if any(f is not None and not callable(f) for f in activations):
      raise TypeError("curvax.kfra: every entry of activations must be callable or None.")
  if kwargs.get("fallback", "diagonal") != "diagonal":
    raise ValueError("curvax.kfra: fallback does not apply: KFRA requires every parameter "
                     "to belong to a Dense layer of the chain.")
  estimator = lambda cap, key: kron.kfra_factors(cap, activations, check=check_chain)
  return kronecker_factored(loss, estimator, name="curvax.kfra", **kwargs)


EKFAC_GAMMA = 3e-2  # initial γ of curvax.ekfac (its docstring has the evidence)


@_documented
def ekfac(loss: "losses_lib.Loss | str", *, curvature: str = "fisher",
          num_samples: Optional[int] = None, weight_sharing: str = "expand",
          max_columns: Optional[float] = None, damping_form: str = "exact",
          scale_fraction: float = 1.0, **kwargs) -> optax.GradientTransformationExtraArgs:
  """EKFAC (George et al. 2018): KFAC in the factors' eigenbasis with the diagonal there
  re-estimated from per-example gradients (:mod:`curvax.kron.ekfac`).

  The factors and their eigenbases are KFAC's (``curvature="fisher"``: targets sampled
  from the model) or KFLR's (``"ggn"``: the columns of ``H_L``'s square root); on every
  factor update the per-example gradients of the same columns, rotated into the basis
  and squared, update the diagonal ``S`` that replaces ``s_Q ⊗ s_𝒢``; the preconditioner
  is ``(U_Q ⊗ U_𝒢) (S + k)⁻¹ (U_Q ⊗ U_𝒢)ᵀ`` with ``k = γ + η`` — exact damping. The step
  size, momentum and the γ / τ rules are :func:`kfac`'s. A step costs about one KFAC
  step with ``inverse="eigh_exact"`` plus, per layer, one product of the rotated rows
  (``Σ_n ã_n² ⊗ c̃_n²``; per example and position with weight sharing): 1.41× a KFAC
  step on the paper's autoencoder, 1.13× with ``inverse_period=20,
  scale_fraction=0.25``; on the MNIST MLP (batch 128) 1.60× and 1.27×
  (``docs/evidence/ekfac.md``).
  {usage}

  Args:
    curvature: ``"fisher"`` (Monte-Carlo, :func:`kfac`'s estimator) or ``"ggn"`` (exact,
      :func:`kflr`'s: ``K`` backward passes a step).
    num_samples: Monte-Carlo samples per step with ``"fisher"`` (``None``: 1).
    {weight_sharing} (The diagonal always uses each example's exact gradient, summed
      over its positions.)
    max_columns: with ``"ggn"``, as :func:`kflr`.
    damping_form: ``"exact"`` (the paper's: ``S + k``) or ``"factored"``: ``S`` plus
      what KFAC's factored damping adds to ``s_Q ⊗ s_𝒢`` (``s_Q ω⁻¹√k + ω√k s_𝒢 + k``,
      eq. 36–38), which damps directions with a large factor eigenvalue more.
    scale_fraction: re-estimate ``S`` from the leading ``⌈fraction·B⌉`` examples of each
      curvature batch (scaled by ``B/m``: unbiased), in ``(0, 1]``. Rotating every
      example's rows into the basis costs as much as estimating the factors; 1 (default)
      is the paper's whole batch. A departure from the authors' code when below 1.{common}

  ``inverse`` is EKFAC's own representation and cannot be chosen. The initial ``gamma``
  defaults to ``3e-2`` here, not :func:`kfac`'s ``3e-4``: the exact damping adds ``γ``
  alone where the factored one adds ``π√γ`` and ``√γ/π`` to the factors, and with
  ``3e-4`` EKFAC diverged on the small byte-level transformer (validation loss 5.98 →
  5·10¹⁰ in 60 steps; 2.61 with ``3e-2``, KFAC 2.62) and on the CNN ``3e-2`` reaches a
  probe loss of 0.085 after 60 updates to ``3e-4``'s 0.504 (KFAC 0.071); on the paper's
  autoencoder the initial γ makes no difference (206.15 vs 206.18) and on the MNIST MLP
  ``3e-4`` is ahead (0.154 vs 0.185; ``benchmarks/results/ekfac_defaults.json``)."""
  if "inverse" in kwargs:
    raise ValueError("curvax.ekfac: inverse= does not apply: EKFAC's representation is "
                     "its corrected eigenbasis (use curvax.kfac(loss, inverse=...) for "
                     "the others).")
  kwargs = _common("curvax.ekfac", kwargs,
                   own=("curvature", "num_samples", "weight_sharing", "max_columns",
                        "damping_form", "scale_fraction"))
  kwargs.setdefault("gamma", EKFAC_GAMMA)
  forms = {"exact": stages.EKFAC, "factored": stages.EKFAC_FACTORED}
  if damping_form not in forms:
    raise ValueError(f"curvax.ekfac: damping_form must be 'exact' or 'factored', got "
                     f"{damping_form!r}.")
  scale_fraction = static_fraction("curvax.ekfac", scale_fraction, "scale_fraction")
  representation = forms[damping_form]
  if scale_fraction < 1:
    representation = representation._replace(correct=functools.partial(
        representation.correct, fraction=scale_fraction))
  if curvature == "fisher":
    estimator = _fisher_estimator("curvax.ekfac", loss, num_samples, weight_sharing,
                                  kwargs)
  elif curvature == "ggn":
    estimator = _ggn_estimator("curvax.ekfac", weight_sharing, max_columns, kwargs)
  else:
    raise ValueError(f"curvax.ekfac: curvature must be 'fisher' or 'ggn', got "
                     f"{curvature!r}.")
  estimator = functools.partial(estimator, examples=True)
  return kronecker_factored(loss, estimator, name="curvax.ekfac",
                            inverse=representation,
                            **kwargs)
