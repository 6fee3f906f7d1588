"""One Kronecker-factored step (:func:`curvax.kfac`, ``kflr``, ``kfra``) as named stages.

kfra_kflr.md Algorithm 1 with the rules of its App. C, in the order a step runs them:

1. :func:`make_context` — capture the layers on the batch and linearise the network (one
   forward pass, :func:`curvax.kron.capture`); the gradient comes from the same pass;
2. :func:`estimate_factors` — this batch's factors and their moving averages (every
   ``factor_period`` steps);
3. representation — the factors' damped inverses, refreshed every ``inverse_period``
   steps: a pluggable :class:`Representation` (:data:`CHOLESKY`, eq. 36–38, refreshed
   per γ candidate inside :func:`choose_gamma`; or the eigenbases :data:`EIGH` /
   :data:`EIGH_EXACT`, refreshed once by :func:`represent`; or EKFAC's corrected
   eigenbasis :data:`EKFAC`, refreshed and corrected with the factors by
   :func:`estimate_and_represent`);
4. :func:`candidate` — ``δ̃ = C̃⁻¹ ∇f`` and the α/μ quadratic model (eq. 39–41);
5. :func:`choose_gamma` — the greedy γ rule over candidates (App. C.3.2);
6. :func:`tau_rule` — the Levenberg-Marquardt rule on ρ (eq. 42, App. C.3.1);
7. :func:`curvax.nonfinite.guard` — a non-finite batch changes nothing.

Each stage is a plain function of a :class:`Context` (what the network gave on this
batch) and :class:`Settings` (the validated hyperparameters), testable alone.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from curvax import damping as damping_lib
from curvax import extra_args as extra_args_lib
from curvax import quadratic
from curvax._validation import ScalarOrSchedule, concrete_value, value_at
from curvax.kron.capture import Capture, capture
from curvax.kron import eigen
from curvax.kron import ekfac
from curvax.kron import state as kron_state
from curvax.kron.factors import Estimate

PyTree = Any
Estimator = Callable[[Capture, jax.Array], Estimate]


class Settings(NamedTuple):
  """The validated hyperparameters a step reads (see :func:`curvax.kfac`)."""
  name: str
  learning_rate: ScalarOrSchedule
  weight_decay: ScalarOrSchedule
  decays: bool  # False when weight_decay is known to be 0: its terms leave the program
  factor_decay: ScalarOrSchedule
  factor_period: Any
  inverse_period: Any
  tau_period: Any
  tau_factor: Any
  gamma_period: Any
  gamma_factor: Any
  min_damping: ScalarOrSchedule
  max_damping: ScalarOrSchedule
  momentum: bool
  momentum_bounds: Optional[tuple[float, float]]
  fallback: str
  seed: int
  axis_name: Optional[str]
  curvature_fraction: float = 1.0
  min_tau: ScalarOrSchedule = 0.0


class Representation(NamedTuple):
  """How the averaged factors are turned into ``C̃⁻¹`` — the one pluggable stage.

  Attributes:
    init: ``(params, max_factor_dim) -> (Factors, representation)``: zero factors and
      the representation of "no curvature yet" (the identity).
    refresh: ``(factors, previous, capture, damping) -> representation`` for the
      damping ``k = γ + η``; slots no captured block fills keep ``previous``.
    precondition: ``(capture, grad, factors, representation, damping, fallback=) ->
      δ̃``, for the ``damping`` the representation was refreshed with (or any damping,
      when it does not depend on one).
    depends_on_damping: whether ``refresh`` depends on the damping. If not, the γ
      rule's candidates share one refresh (made only on ``inverse_period`` steps).
    correct: ``(representation, capture, estimate, decay=, first=, accept=) ->
      representation``, for a representation re-estimated from each batch's
      per-example rows (:data:`EKFAC`), or ``None``.
  """
  init: Callable
  refresh: Callable
  precondition: Callable
  depends_on_damping: bool = True
  correct: Optional[Callable] = None


# Factored Tikhonov damping and Cholesky inverses (eq. 36–38; kfra_kflr.md App. C.1).
CHOLESKY = Representation(init=kron_state.init, refresh=kron_state.invert,
                          precondition=kron_state.precondition)
# The factors' eigenbases, with the factored damping (the same preconditioner as
# CHOLESKY) or the exact damping of eq. 35 (curvax.kron.eigen).
EIGH = Representation(init=eigen.init, refresh=eigen.decompose,
                      precondition=eigen.preconditioner(exact=False),
                      depends_on_damping=False)
EIGH_EXACT = EIGH._replace(precondition=eigen.preconditioner(exact=True))
REPRESENTATIONS = {"cholesky": CHOLESKY, "eigh": EIGH, "eigh_exact": EIGH_EXACT}
# The eigenbases with the diagonal re-estimated in them (curvax.kron.ekfac): needs an
# estimator that keeps the per-example rows (curvax.ekfac).
EKFAC = Representation(init=ekfac.init, refresh=ekfac.refresh,
                       precondition=ekfac.preconditioner(factored=False),
                       depends_on_damping=False, correct=ekfac.correct)
# EKFAC with what KFAC's factored damping adds to the eigenvalues (curvax.kron.ekfac).
EKFAC_FACTORED = EKFAC._replace(precondition=ekfac.preconditioner(factored=True))


class Context(NamedTuple):
  """What every stage of one step reads: the network captured on the curvature batch,
  the gradient and loss of the whole batch, and the step's scalars (in ``dtype``: at
  least float32).

  The curvature batch is the batch itself, or with a ``curvature_fraction`` below 1 (or
  ``curvature_predict_fn``) a sub-batch: the factors, the J-products of the α/μ model
  and the γ rule, and the τ rule's ρ come from it; the gradient from the whole batch.
  """
  capture: Capture  # on the curvature batch
  predict: Callable  # the network on the curvature batch
  targets: Any  # the curvature batch's targets
  params: PyTree
  grad: PyTree  # of the whole batch's objective: the loss plus (η/2)‖θ‖²
  loss_value: jax.Array  # the whole batch's loss
  count: jax.Array
  dtype: Any
  decay: Any  # η at this step; the Python 0.0 when known to be 0
  bounds: tuple  # (min_damping, max_damping) at this step
  sub_batch: bool = False

  @property
  def lin(self):
    """The linearisation on the curvature batch."""
    return self.capture.lin

  def loss_at(self, params: PyTree) -> jax.Array:
    """The loss at other ``params`` on the curvature batch (one forward pass)."""
    lin = self.lin
    return lin.batch_mean(lin.loss.value(self.predict(params), self.targets))

  def loss_finite(self) -> jax.Array:
    if not self.sub_batch:
      return jnp.isfinite(self.loss_value)
    return jnp.isfinite(self.loss_value) & jnp.isfinite(self.lin.loss_value)

  def curvature_grad(self) -> PyTree:
    """The objective's gradient on the curvature batch (one backward pass over the
    sub-batch when it is one), for ρ's model change over the same examples."""
    if not self.sub_batch:
      return self.grad
    return _with_decay(self.capture.grad(), self.params, self.decay)

  def at_count(self, value: ScalarOrSchedule) -> jax.Array:
    return jnp.asarray(value_at(value, self.count), self.dtype)


class Candidate(NamedTuple):
  """``δ* = α δ̃ + μ δ_prev`` for one γ: the step, its J-image, coefficients, model
  value ``f̂(δ*)``, the γ and the representation it was made with."""
  step: PyTree
  image: jax.Array
  alpha: jax.Array
  mu: jax.Array
  value: jax.Array
  gamma: jax.Array
  representation: Any


class Momentum(NamedTuple):
  """The previous step ``δ_prev`` (in the parameters' dtypes) and its J-image."""
  velocity: PyTree
  image: jax.Array


def due(count: jax.Array, period: Any) -> Union[bool, jax.Array]:
  """Whether a rule with this period runs at ``count`` (``count % period == 0``; a
  period of 0 never). ``False`` (a Python bool) when that is known at trace time."""
  known = concrete_value(period)
  if known == 0:
    return False
  if known == 1:
    return True
  if known is not None:
    return count % int(known) == 0
  return (period > 0) & (count % jnp.maximum(period, 1) == 0)


def _with_decay(grad: PyTree, params: PyTree, decay) -> PyTree:
  """``∇f + η θ``, in the gradient's dtypes (``decay`` 0.0: ``∇f`` itself)."""
  if isinstance(decay, float) and decay == 0.0:
    return grad
  return jax.tree.map(lambda g, p: (g + decay * p).astype(g.dtype), grad, params)


def make_context(settings: Settings, loss, factors: kron_state.Factors, count: jax.Array,
                 updates, params, *, predict_fn, targets, linearization,
                 curvature_predict_fn=None, curvature_targets=None) -> Context:
  """Stage 1: capture and linearise the network on the curvature batch (one forward
  pass); the gradient of the whole batch comes from the same pass, or from one
  ``value_and_grad`` of the whole batch when the curvature batch is a sub-batch."""
  name, axis_name = settings.name, settings.axis_name
  given = extra_args_lib.given_gradient(name, updates, params)
  # The capture runs the network itself; a passed-in linearisation supplies the model.
  predict, targets = extra_args_lib.model_from(
      name, predict_fn=predict_fn, targets=targets, linearization=linearization,
      axis_name=axis_name)
  sub = _curvature_batch(settings, predict, targets, curvature_predict_fn,
                         curvature_targets)
  curvature_predict, curvature_targets, rows = sub or (predict, targets, None)
  cap = capture(curvature_predict, params, loss=loss, targets=curvature_targets,
                slots=kron_state.slots(factors), full_slots=kron_state.full_slots(factors),
                solver=name, axis_name=axis_name, rows=rows)
  if rows is not None:  # the capture cut them: ρ's trial loss runs on the same rows
    curvature_predict, curvature_targets = cap.predict_fn, cap.lin.targets
  # Scalars in at least float32: the damping bounds (1e-8, 1e8) do not exist in
  # float16, and the state keeps them in float32.
  dtype = jnp.promote_types(cap.lin.loss_value.dtype, jnp.float32)
  at_count = lambda value: jnp.asarray(value_at(value, count), dtype)
  decay = at_count(settings.weight_decay) if settings.decays else 0.0
  bounds = (at_count(settings.min_damping), at_count(settings.max_damping))
  if sub is None:
    loss_value, grad = cap.lin.loss_value, (cap.grad() if given is None else given)
  else:
    loss_value, grad = _whole_batch(loss, predict, targets, params, given, axis_name)
  return Context(cap, curvature_predict, curvature_targets, params,
                 _with_decay(grad, params, decay), loss_value, count, dtype, decay, bounds,
                 sub_batch=sub is not None)


def _curvature_batch(settings: Settings, predict, targets, curvature_predict_fn,
                     curvature_targets):
  """``(predict, targets, rows)`` of the curvature sub-batch — given, or the first
  ``⌈f·B⌉`` examples (``rows``; the capture cuts them) — or ``None`` for the batch."""
  given = (curvature_predict_fn is not None, curvature_targets is not None)
  if any(given) and not all(given):
    raise ValueError(f"{settings.name}: pass both curvature_predict_fn= and "
                     "curvature_targets= (the curvature sub-batch), or neither.")
  if all(given):
    return curvature_predict_fn, curvature_targets, None
  if settings.curvature_fraction >= 1:
    return None
  batch = jax.tree.leaves(targets)[0].shape[0]
  rows = max(1, math.ceil(settings.curvature_fraction * batch))
  return (predict, targets, rows) if rows < batch else None


def _whole_batch(loss, predict, targets, params, given, axis_name):
  """The whole batch's loss and gradient (``given`` when passed in), averaged over the
  data-parallel axis."""
  objective = lambda p: loss.value(predict(p), targets)
  if given is None:
    value, grad = jax.value_and_grad(objective)(params)
  else:
    value, grad = objective(params), given
  if axis_name is not None:
    value = jax.lax.pmean(value, axis_name)
    if given is None:
      grad = jax.lax.pmean(grad, axis_name)
  return value, grad


def _estimate(ctx: Context, settings: Settings, estimator: Estimator,
              factors: kron_state.Factors):
  """This batch's estimate, the averages it gives and whether it was accepted."""
  key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), ctx.count)
  estimate = estimator(ctx.capture, key)
  # Decided inside the averaging pass, so the final guard need not select over the
  # factors again.
  accept = ctx.loss_finite() & kron_state.estimate_finite(estimate)
  averaged = kron_state.update(factors, estimate, ctx.capture,
                               decay=value_at(settings.factor_decay, ctx.count),
                               first=ctx.count == 0, accept=accept)
  return estimate, averaged, accept


def _when(condition: Union[bool, jax.Array], make: Callable, otherwise: Callable):
  """``make()`` where ``condition`` holds, else ``otherwise()``: decided in Python when
  the condition is known at trace time, by ``lax.cond`` (one branch runs) when not."""
  if condition is True:
    return make()
  if condition is False:
    return otherwise()
  return jax.lax.cond(condition, make, otherwise)


def estimate_factors(ctx: Context, settings: Settings, estimator: Estimator,
                     factors: kron_state.Factors) -> tuple[kron_state.Factors, jax.Array]:
  """Stage 2: the batch's factor estimate folded into the moving averages.

  Returns ``(factors, accept)``: ``accept`` is false for a non-finite batch, whose
  estimate leaves the factors as they were. Between factor updates (``factor_period``)
  the estimator's passes — KFAC's sampled backward, the factor products — are skipped
  at run time: ``lax.cond`` executes one branch.
  """
  def estimated():
    _, averaged, accept = _estimate(ctx, settings, estimator, factors)
    return averaged, accept

  return _when(due(ctx.count, settings.factor_period), estimated,
               lambda: (factors, ctx.loss_finite()))


def estimate_and_represent(ctx: Context, settings: Settings, estimator: Estimator,
                           representation: Representation, factors: kron_state.Factors,
                           stored: Any) -> tuple[kron_state.Factors, jax.Array, Any]:
  """Stages 2 and 3: :func:`estimate_factors` then :func:`represent`; for a
  representation that is corrected from the batch's per-example rows (:data:`EKFAC`),
  on factor-update steps: the averages, the refresh of the basis (when
  ``inverse_period`` is due) and the correction in that basis, in that order.

  Returns ``(factors, accept, representation)``."""
  if representation.correct is None:
    factors, accept = estimate_factors(ctx, settings, estimator, factors)
    return factors, accept, represent(ctx, settings, representation, factors, stored)

  def estimated():
    estimate, averaged, accept = _estimate(ctx, settings, estimator, factors)
    basis = _when(due(ctx.count, settings.inverse_period),
                  lambda: representation.refresh(averaged, stored, ctx.capture, None),
                  lambda: stored)
    corrected = representation.correct(
        basis, ctx.capture, estimate, decay=value_at(settings.factor_decay, ctx.count),
        first=ctx.count == 0, accept=accept)
    return averaged, accept, corrected

  return _when(due(ctx.count, settings.factor_period), estimated,
               lambda: (factors, ctx.loss_finite(), stored))


def momentum_terms(ctx: Context, velocity: PyTree) -> Momentum:
  """``δ_prev`` in the parameters' dtypes and its J-image (one J-product a step)."""
  velocity = jax.tree.map(lambda v, p: v.astype(p.dtype), velocity, ctx.params)
  return Momentum(velocity, ctx.capture.jvp(velocity))


def candidate(ctx: Context, settings: Settings, representation: Representation,
              factors: kron_state.Factors, rep: Any, gamma: jax.Array,
              momentum: Optional[Momentum], model_damping: jax.Array) -> Candidate:
  """Stage 4: ``δ̃ = C̃⁻¹ ∇f`` for ``k = γ + η`` and ``δ* = α δ̃ (+ μ δ_prev)`` minimising
  ``f̂(δ) = ∇fᵀδ + ½ δᵀ(G + (τ + η)I)δ`` (eq. 39–41; the 2×2 solve of Martens & Grosse
  §7 with ``μ`` in ``momentum_bounds``). ``δ̃ᵀGδ̃`` is the full GGN of the batch:
  ``(J δ̃)ᵀ H_L (J δ̃)``, one J-product."""
  lin, grad = ctx.lin, ctx.grad
  direction = representation.precondition(ctx.capture, grad, factors, rep,
                                          gamma + ctx.decay, fallback=settings.fallback)
  directions, images = [direction], [ctx.capture.jvp(direction)]
  if momentum is not None:
    directions.append(momentum.velocity)
    images.append(momentum.image)
  model = quadratic.build(images, directions, output_hvp=lin.output_hvp,
                          gradient_dots=[optax.tree.vdot(grad, d) for d in directions],
                          damping=model_damping, output_vdot=lin.output_vdot)
  bounds = settings.momentum_bounds
  coefficients = (quadratic.minimiser_bounded(model, 1, *bounds)
                  if momentum is not None and bounds is not None
                  else quadratic.minimiser(model))
  value = quadratic.predicted_change(model, coefficients, damped=True)
  step = optax.tree.scale(coefficients[0], direction)
  image = coefficients[0] * images[0]
  if momentum is not None:
    step = optax.tree.add_scale(step, coefficients[1], momentum.velocity)
    image = image + coefficients[1] * images[1]
  mu = coefficients[1] if momentum is not None else jnp.zeros((), ctx.dtype)
  return Candidate(step, image, coefficients[0], mu, value, gamma, rep)


def represent(ctx: Context, settings: Settings, representation: Representation,
              factors: kron_state.Factors, stored: Any) -> Any:
  """Stage 3 for a representation that does not depend on the damping (:data:`EIGH`):
  refreshed every ``inverse_period`` steps, once for all the γ rule's candidates.
  A damping-dependent one (:data:`CHOLESKY`) is returned as stored: :func:`choose_gamma`
  refreshes it per candidate."""
  if representation.depends_on_damping:
    return stored
  return _when(due(ctx.count, settings.inverse_period),
               lambda: representation.refresh(factors, stored, ctx.capture, None),
               lambda: stored)


def choose_gamma(ctx: Context, settings: Settings, representation: Representation,
                 factors: kron_state.Factors, stored: Any, gamma: jax.Array,
                 momentum: Optional[Momentum], model_damping: jax.Array) -> Candidate:
  """Stages 3 and 5: the representation (refreshed every ``inverse_period`` steps) and,
  every ``gamma_period`` steps, the greedy γ rule (App. C.3.2).

  On γ-rule steps the γ among ``{ω_γγ, γ, γ/ω_γ}`` whose ``δ*`` minimises ``f̂`` is
  kept, each candidate with a fresh representation; on other steps the current γ alone.
  The rule runs on counts ``0, T_γ, 2T_γ, …``, which are refresh steps when ``T_γ`` is a
  multiple of ``inverse_period``: the chosen representation is that step's refresh. A
  representation that does not depend on the damping (:data:`EIGH`) comes refreshed
  from :func:`represent` and every candidate uses it.
  """
  rule_now = due(ctx.count, settings.gamma_period)
  # A damping-free representation was refreshed by `represent`, once for every γ.
  refresh = (due(ctx.count, settings.inverse_period)
             if representation.depends_on_damping else False)

  def evaluate(gamma_value, fresh):
    """The candidate for one γ with a representation made for it (``fresh``) or the
    stored one."""
    rep = _when(fresh, lambda: representation.refresh(factors, stored, ctx.capture,
                                                      gamma_value + ctx.decay),
                lambda: stored)
    return candidate(ctx, settings, representation, factors, rep, gamma_value, momentum,
                     model_damping)

  if rule_now is False:
    return evaluate(gamma, refresh)
  # One loop over the candidates (not a Python loop, nor a cond between the rule and
  # the plain step) puts ONE representation refresh and one candidate in the program
  # instead of four: a quarter of the code for XLA to compile. (Not jax.vmap: batched
  # Cholesky inside lax.cond hung XLA:CPU.)
  low, high = ctx.bounds
  gammas = jnp.where(rule_now, damping_lib.gamma_candidates(
      gamma, jnp.asarray(settings.gamma_factor, ctx.dtype), min_gamma=low,
      max_gamma=high), gamma)
  fresh = rule_now | refresh if representation.depends_on_damping else False
  first = jnp.where(rule_now, 0, 1)

  def better(i, best):
    result = evaluate(gammas[i], fresh)
    # damping_lib.best_candidate's choice, one candidate at a time: the lowest finite
    # model value, the first on ties, the first if none is finite.
    value = jnp.where(jnp.isfinite(result.value), result.value, jnp.inf)
    take = (i == first) | (value < best[0])
    return optax.tree.where(take, (value, result), best)

  shapes = jax.eval_shape(lambda: evaluate(gamma, fresh))
  start = (jnp.asarray(jnp.inf, shapes.value.dtype), optax.tree.zeros_like(shapes))
  _, chosen = jax.lax.fori_loop(first, jnp.where(rule_now, 3, 2), better, start)
  return chosen


def objective(settings: Settings, value: jax.Array, params: PyTree, decay) -> jax.Array:
  """The loss plus the L2 term ``(η/2)‖θ‖²`` (App. C)."""
  if not settings.decays:
    return value
  return value + 0.5 * decay * optax.tree.norm(params, squared=True)


def tau_floor(ctx: Context, settings: Settings) -> jax.Array:
  """The τ rule's lower bound: the larger of ``min_damping`` and ``min_tau``."""
  return jnp.maximum(ctx.bounds[0], ctx.at_count(settings.min_tau))


def tau_rule(ctx: Context, settings: Settings, previous_ratio: jax.Array, step: PyTree,
             image: jax.Array, model_damping: jax.Array,
             tau: jax.Array) -> tuple[jax.Array, jax.Array, Union[bool, jax.Array]]:
  """Stage 6: every ``tau_period`` steps ρ (eq. 42) and the LM update of τ
  (App. C.3.1) — one extra forward pass on those steps.

  Returns ``(τ, ρ, taken)``: ``taken`` is false when the loss at ``θ + δ*`` is not
  finite; the step is then rejected and ``τ`` grows as for ``ρ < 0.75`` (``ρ = −∞``).
  """
  now = due(ctx.count + 1, settings.tau_period)
  if now is False:
    return tau, previous_ratio, True
  lin, params = ctx.lin, ctx.params

  def evaluate():
    predicted = (optax.tree.vdot(ctx.curvature_grad(), step)
                 + 0.5 * (lin.output_vdot(image, lin.output_hvp(image))
                          + model_damping * optax.tree.norm(step, squared=True)))
    new_params = optax.tree.add(params, step)
    trial = ctx.loss_at(new_params)
    new_value = objective(settings, trial, new_params, ctx.decay)
    actual = new_value - objective(settings, lin.loss_value, params, ctx.decay)
    taken = jnp.isfinite(new_value)
    # A NaN ratio would leave τ unchanged: a non-finite trial loss counts as ρ = −∞.
    ratio = jnp.where(taken, quadratic.reduction_ratio(actual, predicted), -jnp.inf)
    new_tau = damping_lib.tau_rule(tau, ratio,
                                   factor=jnp.asarray(settings.tau_factor, tau.dtype),
                                   min_tau=tau_floor(ctx, settings),
                                   max_tau=ctx.bounds[1])
    return new_tau.astype(tau.dtype), ratio.astype(jnp.float32), taken

  def keep():
    return tau, previous_ratio, jnp.asarray(True)

  return jax.lax.cond(now, evaluate, keep)
