"""KFAC, KFLR and KFRA (Botev, Ritter & Barber, kfra_kflr.md) as optax transformations.

All three are one preconditioner over Kronecker-factored GGN blocks
``G̃_λ = Q̃_λ ⊗ 𝒢̃_λ`` (eq. 19–21) and differ only in the estimator of the output factor
``𝒢̃_λ`` (:mod:`curvax.kron.factors`): Monte-Carlo Fisher (KFAC), exact low rank (KFLR,
eq. 23–25) or the recursive approximation (KFRA, eq. 26 and Algorithm 1). One step:

1. capture the layers and linearise the network (one forward pass,
   :func:`curvax.kron.capture`); the gradient comes from the same pass;
2. estimate the factors, update their moving averages (decay 0.9: §5), and every
   ``inverse_period`` steps (and on γ-rule steps) their damped inverses
   (``jax.lax.cond`` on the count);
3. ``δ̃ = C̃⁻¹ ∇f`` with the factored damping ``(Q̃ + ω√k I) ⊗ (𝒢̃ + ω⁻¹√k I)``,
   ``k = γ + η`` (eq. 33–38);
4. ``δ* = α* δ̃`` with ``α* = −δ̃ᵀ∇f / (δ̃ᵀ G δ̃ + (τ + η)‖δ̃‖²)`` (eq. 39–41), where
   ``δ̃ᵀ G δ̃ = (J δ̃)ᵀ H_L (J δ̃)`` is the full GGN of the batch: ONE J-product. With
   ``momentum=True`` the step is ``α δ̃ + μ δ_prev`` with ``(α, μ)`` minimising the same
   model (the 2×2 solve of Martens & Grosse §7); both come from
   :mod:`curvax.quadratic`;
5. every ``tau_period`` steps the Levenberg-Marquardt rule on
   ``ρ = (f(θ + δ*) − f(θ)) / (f̂(δ*) − f̂(0))`` (eq. 42): ``τ·ω_τ`` if ``ρ > 0.75``,
   ``τ/ω_τ`` if ``ρ < 0.75``, ``ω_τ = 0.95^{T_τ}`` (App. C.3.1) — one extra forward pass
   on those steps;
6. every ``gamma_period`` steps the greedy γ rule (App. C.3.2): the inverses and the
   step are computed for each of ``{ω_γ γ, γ, γ/ω_γ}`` (``ω_γ = 0.95^{T_γ}``) and the
   ``γ`` whose ``δ*`` minimises the quadratic model ``f̂(δ*)`` — the full-GGN model of
   step 4 — is kept with its inverses (two more J-products on those steps). The rule
   runs on the first step of every period (counts ``0, T_γ, 2T_γ, …``), which are
   inverse-refresh steps when ``T_γ`` is a multiple of ``inverse_period``: the chosen
   inverses are that step's refresh, so the rule adds two inverse sets, not three.

``η`` is an L2 regulariser ``(η/2)‖θ‖²`` added to the objective (App. C), 0 by default.
The quadratic model of steps 4–6 is ``f̂(δ) = ∇fᵀδ + ½ δᵀ(G + (τ + η)I)δ``.

Deviations and choices (see also the README):

* the damped inverses (two positive-definite inversions per layer, App. C.1; see
  :mod:`curvax.kron.inverse`) are kept in the state and refreshed every
  ``inverse_period`` steps and on γ-rule steps, as in KFAC;
  Algorithm 1 refreshes them every step (``inverse_period=1``, the default);
* the reduction ratio of eq. 42 uses the damped model ``G + (τ + η)I``, as written in
  App. C.3.1 (KFAC's §6.5 leaves ``τ`` out);
* parameters outside every captured layer get a diagonal GGN estimate
  (``fallback="diagonal"``) or the identity, with a warning; KFRA refuses them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from curvax import damping as damping_lib
from curvax import extra_args as extra_args_lib
from curvax import kron
from curvax import losses as losses_lib
from curvax import nonfinite
from curvax import quadratic
from curvax._validation import check_fraction, check_positive
from curvax.kron import state as kron_state

PyTree = Any


class KFACState(NamedTuple):
  """State of :func:`kfac`, :func:`kflr` and :func:`kfra`.

  Attributes:
    factors: moving averages of ``Q̃``, ``𝒢̃`` and the fallback diagonals, per leaf.
    inverse: the damped inverses of the factors for the current ``γ``, refreshed
      every ``inverse_period`` steps and on γ-rule steps.
    velocity: the previous step ``δ*`` (``momentum=True``; ``None`` otherwise).
    gamma: ``γ``, the damping of the approximate curvature (App. C.3.2).
    tau: ``τ``, the damping of the full-GGN quadratic model (App. C.3.1).
    count: steps taken (finite batches only).
    loss: the loss at the parameters the step started from (free: from its own
      forward pass; without the L2 term).
    alpha, mu: the coefficients of ``δ̃`` and ``δ_prev`` in the last step.
    reduction_ratio: the last ``ρ`` of the τ rule (NaN before the first).
    num_skipped: batches whose loss, factors or step were not finite; such a batch
      leaves parameters and every other field unchanged, except that on an
      inverse-refresh step the freshly computed inverses may stay (the count does not
      advance, so the next step computes them again before they are used).
  """
  factors: kron_state.Factors
  inverse: kron_state.Inverse
  velocity: Optional[PyTree]
  gamma: jax.Array
  tau: jax.Array
  count: jax.Array
  loss: jax.Array
  alpha: jax.Array
  mu: jax.Array
  reduction_ratio: jax.Array
  num_skipped: jax.Array


def kronecker_factored(loss: "losses_lib.Loss | str",
                       estimator: Callable[[kron.Capture, jax.Array], kron.Estimate], *,
                       name: str = "kronecker_factored", learning_rate: float = 1.0,
                       gamma: float = 1e-2, tau: float = 1e-2, weight_decay: float = 0.0,
                       factor_decay: float = 0.9, inverse_period: int = 1,
                       tau_period: int = 5, tau_factor: Optional[float] = None,
                       gamma_period: int = 20, gamma_factor: Optional[float] = None,
                       min_damping: float = 1e-8, max_damping: float = 1e8,
                       momentum: bool = False, fallback: str = "diagonal",
                       max_factor_dim: Optional[int] = 4096, seed: int = 0,
                       axis_name: Optional[str] = None
                       ) -> optax.GradientTransformationExtraArgs:
  """The shared optimiser behind :func:`kfac`, :func:`kflr` and :func:`kfra`.

  ``estimator(capture, key) -> kron.Estimate`` gives one batch's factors; see
  :func:`kfac` for the other arguments.
  """
  loss = losses_lib.get(loss)
  check_positive("learning_rate", learning_rate)
  check_positive("gamma", gamma)
  check_positive("tau", tau)
  if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
  if not 0 <= factor_decay < 1:
    raise ValueError(f"factor_decay must lie in [0, 1), got {factor_decay!r}.")
  for arg, value, least in (("inverse_period", inverse_period, 1),
                            ("tau_period", tau_period, 0),
                            ("gamma_period", gamma_period, 0)):
    if not isinstance(value, int) or value < least:
      raise ValueError(f"{arg} must be an integer >= {least}"
                       f"{' (0 disables the rule)' if least == 0 else ''}, got {value!r}.")
  tau_factor = damping_lib.period_factor(tau_period) if tau_factor is None else tau_factor
  gamma_factor = (damping_lib.period_factor(gamma_period) if gamma_factor is None
                  else gamma_factor)
  check_fraction("tau_factor", tau_factor)
  check_fraction("gamma_factor", gamma_factor)
  if not 0 < min_damping <= min(gamma, tau) or max(gamma, tau) > max_damping:
    raise ValueError(f"gamma and tau must lie in [min_damping, max_damping] = "
                     f"[{min_damping}, {max_damping}] with min_damping > 0, got "
                     f"gamma={gamma}, tau={tau}.")
  if fallback not in ("diagonal", "identity"):
    raise ValueError(f"fallback must be 'diagonal' or 'identity', got {fallback!r}.")
  if max_factor_dim is not None and max_factor_dim < 2:
    raise ValueError(f"max_factor_dim must be >= 2 or None, got {max_factor_dim!r}.")

  def init_fn(params):
    factors, inverse = kron_state.init(params, max_factor_dim=max_factor_dim)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return KFACState(
        factors=factors, inverse=inverse,
        velocity=optax.tree.zeros_like(params) if momentum else None,
        gamma=f32(gamma), tau=f32(tau), count=jnp.zeros((), jnp.int32), loss=f32(jnp.nan),
        alpha=f32(0.0), mu=f32(0.0), reduction_ratio=f32(jnp.nan),
        num_skipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, predict_fn=None, targets=None,
                linearization=None, **extra_args):
    del extra_args  # Other transforms' arguments in an optax.chain.
    if params is None:
      raise ValueError(f"{name}: params are required: call tx.update(updates, state, "
                       "params, predict_fn=..., targets=...).")
    # The capture runs the network itself; a passed-in linearisation supplies the model.
    predict, targets = extra_args_lib.model_from(
        name, predict_fn=predict_fn, targets=targets, linearization=linearization,
        axis_name=axis_name)
    cap = kron.capture(predict, params, loss=loss, targets=targets,
                       max_factor_dim=max_factor_dim, solver=name, axis_name=axis_name)
    lin = cap.lin
    dtype = lin.loss_value.dtype
    given = extra_args_lib.given_gradient(updates)
    grad = cap.grad() if given is None else given
    if weight_decay:
      grad = optax.tree.add_scale(grad, weight_decay, params)

    # Factors: this batch's estimate and the moving averages.
    key = jax.random.fold_in(jax.random.PRNGKey(seed), state.count)
    estimate = estimator(cap, key)
    # A non-finite batch leaves the factors as they were (decided inside the averaging
    # pass, so the final guard need not select over them again).
    accept = jnp.isfinite(lin.loss_value) & kron_state.estimate_finite(estimate)
    factors = kron_state.update(state.factors, estimate, cap, decay=factor_decay,
                                first=state.count == 0, accept=accept)
    invert = lambda gamma_value: kron_state.invert(factors, state.inverse, cap,
                                                   gamma_value + weight_decay)

    tau_now = state.tau.astype(dtype)
    model_damping = tau_now + weight_decay
    if momentum:
      velocity = jax.tree.map(lambda v, p: v.astype(p.dtype), state.velocity, params)
      j_velocity = cap.jvp(velocity)

    def candidate(gamma_value, inverse):
      """δ* for one γ: direction, its J-image, coefficients and model value."""
      direction = kron_state.precondition(cap, grad, factors, inverse,
                                          gamma_value + weight_decay, fallback=fallback)
      directions, images = [direction], [cap.jvp(direction)]
      if momentum:
        directions.append(velocity)
        images.append(j_velocity)
      model = quadratic.build(images, directions, output_hvp=lin.output_hvp,
                              gradient_dots=[optax.tree.vdot(grad, d) for d in directions],
                              damping=model_damping, output_vdot=lin.output_vdot)
      coefficients = quadratic.minimiser(model)
      value = quadratic.predicted_change(model, coefficients, damped=True)
      step = optax.tree.scale(coefficients[0], direction)
      image = coefficients[0] * images[0]
      if momentum:
        step = optax.tree.add_scale(step, coefficients[1], velocity)
        image = image + coefficients[1] * images[1]
      mu = coefficients[1] if momentum else jnp.zeros((), dtype)
      return step, image, coefficients[0], mu, value

    gamma_now = state.gamma.astype(dtype)

    def keep_gamma():
      """The current γ; inverses refreshed every ``inverse_period`` steps."""
      inverse = jax.lax.cond(state.count % inverse_period == 0,
                             lambda: invert(gamma_now), lambda: state.inverse)
      return (*candidate(gamma_now, inverse), gamma_now, inverse)

    def choose_gamma():
      """App. C.3.2: the γ among {ω_γγ, γ, γ/ω_γ} whose δ* minimises f̂."""
      gammas = damping_lib.gamma_candidates(gamma_now, gamma_factor,
                                            min_gamma=min_damping, max_gamma=max_damping)

      def one(gamma_value):
        inverse = invert(gamma_value)
        return (*candidate(gamma_value, inverse), inverse)

      # A Python loop, not jax.vmap: batched Cholesky inside lax.cond hung XLA:CPU.
      results = [one(g) for g in gammas]
      best = damping_lib.best_candidate(jnp.stack([r[4] for r in results]))
      # A switch copies the chosen candidate only (stacking would copy all three sets
      # of inverses and steps first).
      step, image, alpha, mu, value, inverse = jax.lax.switch(
          best, [lambda r=r: r for r in results])
      return step, image, alpha, mu, value, gammas[best], inverse

    if gamma_period:
      due = state.count % gamma_period == 0  # with the inverse refreshes (see above)
      step, image, alpha, mu, value, new_gamma, inverse = jax.lax.cond(
          due, choose_gamma, keep_gamma)
    else:
      step, image, alpha, mu, value, new_gamma, inverse = keep_gamma()

    step = optax.tree.scale(learning_rate, step)
    image = learning_rate * image
    new_tau, ratio = _tau_rule(state, lin, predict, targets, params, grad, step, image,
                               model_damping, tau_now)
    # The inverses need no check of their own: a non-finite entry makes the step
    # non-finite (every entry multiplies the gradient block, and NaN·0 = NaN).
    finite = accept & nonfinite.all_finite(step, alpha, mu)
    new_state = KFACState(
        factors=factors, inverse=inverse, velocity=step if momentum else None,
        gamma=new_gamma.astype(jnp.float32), tau=new_tau.astype(jnp.float32),
        count=state.count + 1, loss=lin.loss_value.astype(jnp.float32),
        alpha=alpha.astype(jnp.float32), mu=mu.astype(jnp.float32),
        reduction_ratio=ratio.astype(jnp.float32), num_skipped=state.num_skipped)
    # Neither the factors (gated above) nor the inverses need the guard's select: a
    # skipped batch leaves the count unchanged, so the next step refreshes the inverses
    # (and reruns the γ rule) before they are used again; stored inverses are only
    # read after the refresh step that wrote them was taken.
    return nonfinite.guard(finite, step, new_state, state,
                           unguarded=("factors", "inverse"))

  def _objective(value, params):
    if not weight_decay:
      return value
    return value + 0.5 * weight_decay * optax.tree.norm(params, squared=True)

  def _tau_rule(state, lin, predict, targets, params, grad, step, image, model_damping,
                tau_now):
    """App. C.3.1 every ``tau_period`` steps: ρ (eq. 42) and the LM update of τ."""
    if not tau_period:
      return tau_now, state.reduction_ratio

    def evaluate():
      predicted = (optax.tree.vdot(grad, step)
                   + 0.5 * (lin.output_vdot(image, lin.output_hvp(image))
                            + model_damping * optax.tree.norm(step, squared=True)))
      new_params = optax.tree.add(params, step)
      new_value = _objective(
          lin.batch_mean(lin.loss.value(predict(new_params), targets)), new_params)
      actual = new_value - _objective(lin.loss_value, params)
      ratio = quadratic.reduction_ratio(actual, predicted)
      new_tau = damping_lib.tau_rule(tau_now, ratio, factor=tau_factor,
                                     min_tau=min_damping, max_tau=max_damping)
      return new_tau.astype(tau_now.dtype), ratio.astype(jnp.float32)

    def keep():
      return tau_now, state.reduction_ratio

    due = (state.count + 1) % tau_period == 0
    return jax.lax.cond(due, evaluate, keep)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_COMMON_ARGS = """
    loss: a :class:`curvax.losses.Loss` or its name.
    learning_rate: scales ``δ*`` (1: the optimum of the quadratic model, eq. 40).
    gamma: initial ``γ``, the damping of the Kronecker-factored curvature (eq. 35).
    tau: initial ``τ``, the damping of the full-GGN model that sets the step size
      (eq. 41).
    weight_decay: ``η``, an L2 term ``(η/2)‖θ‖²`` added to the objective; it enters the
      gradient, ``k = γ + η`` and the model's ``τ + η`` (App. C).
    factor_decay: moving-average decay of the factors (§5: 0.9; 0 uses the batch alone).
    inverse_period: recompute the factors' damped inverses every this many steps
      (Algorithm 1: every step; Martens & Grosse use 20).
    tau_period: ``T_τ`` of the τ rule (App. C.3.1: 5); 0 keeps ``τ`` fixed.
    tau_factor: ``ω_τ``; default ``0.95^{T_τ}``.
    gamma_period: ``T_γ`` of the greedy γ rule (App. C.3.2: 20), applied on steps
      ``0, T_γ, 2T_γ, …``; 0 keeps ``γ`` fixed.
    gamma_factor: ``ω_γ``; default ``0.95^{T_γ}``.
    min_damping, max_damping: bounds for ``γ`` and ``τ``.
    momentum: add KFAC's momentum ``μ δ_prev`` (Martens & Grosse §7) with ``(α, μ)``
      from a 2×2 quadratic-model solve (the paper found no benefit: §5).
    fallback: curvature block of parameters outside every captured layer:
      ``"diagonal"`` (a GGN-diagonal estimate from the estimator's own backward pass)
      or ``"identity"``. A warning names them.
    max_factor_dim: kernels whose factors would be larger than this (and every other
      leaf) use the fallback; also bounds the state allocated for leaves that turn out
      not to be kernels (e.g. embedding tables). ``None``: no bound.
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
  ``optax.add_decayed_weights``) is used instead. Flax linen ``nn.Dense``/``nn.Conv``
  layers are found automatically; in pure JAX or ``flax.nnx`` code mark layers with
  :func:`curvax.kron.dense` (see :mod:`curvax.kron.capture`).
"""


def _documented(fn):
  fn.__doc__ = fn.__doc__.replace("{usage}", _USAGE.strip()).replace(
      "{common}", _COMMON_ARGS.rstrip())
  return fn


@_documented
def kfac(loss: "losses_lib.Loss | str", *, num_samples: int = 1, seed: int = 0,
         **kwargs) -> optax.GradientTransformationExtraArgs:
  """KFAC (Martens & Grosse 2015) in kfra_kflr.md's formulation (App. D.3).

  ``𝒢̃_λ`` is the Monte-Carlo Fisher: targets sampled from the model's predictive
  distribution (``loss.sample``), pulled back to every layer in one backward pass per
  sample. For the exponential-family losses it equals KFLR's exact ``E[𝒢_λ]`` in
  expectation. Dense and Conv layers (KFC).
  {usage}
  Args:
    num_samples: Monte-Carlo samples of the targets per step.
    seed: PRNG seed of the samples (folded with the step count).{common}"""
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
  if losses_lib.get(loss).per_example_sample is None:
    raise ValueError(
        f"curvax.kfac: the loss {losses_lib.get(loss).name!r} defines no predictive "
        "distribution to sample targets from; build it with sample_fn= "
        "(curvax.losses.from_fn) or use curvax.kflr / curvax.kfra.")
  fallback_diagonal = kwargs.get("fallback", "diagonal") == "diagonal"
  estimator = lambda cap, key: kron.kfac_factors(
      cap, key, num_samples=num_samples, fallback_diagonal=fallback_diagonal)
  return kronecker_factored(loss, estimator, name="curvax.kfac", seed=seed, **kwargs)


@_documented
def kflr(loss: "losses_lib.Loss | str", **kwargs) -> optax.GradientTransformationExtraArgs:
  """KFLR: Kronecker-factored GGN with the exact ``E[𝒢_λ]`` (kfra_kflr.md §3.4).

  The ``K`` columns of ``loss.hessian_sqrt`` (``K`` = outputs per example) are pulled
  back to every layer with one vmapped backward pass (eq. 23–25), so the cost grows
  with ``K``: meant for few outputs (classifiers). Dense and Conv layers.
  {usage}
  Args:{common}"""
  fallback_diagonal = kwargs.get("fallback", "diagonal") == "diagonal"
  estimator = lambda cap, key: kron.kflr_factors(cap, key,
                                                 fallback_diagonal=fallback_diagonal)
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
    check_chain: verify at every step (cheaply, from the captured activations) that the
      model computed ``a_λ = f_λ(h_λ)`` and output ``h_L``; a mismatch raises.{common}"""
  if activations is None:
    raise ValueError(
        "curvax.kfra: activations= is required: the elementwise function between "
        "consecutive Dense layers (one callable, or one per gap with None for linear); "
        "curvax.kron.chain_activations(model) gives them for curvax.problems.models.MLP "
        "and Autoencoder.")
  if not callable(activations):
    activations = tuple(activations)
    if any(f is not None and not callable(f) for f in activations):
      raise TypeError("curvax.kfra: every entry of activations must be callable or None.")
  if kwargs.get("fallback", "diagonal") != "diagonal":
    raise ValueError("curvax.kfra: fallback does not apply: KFRA requires every parameter "
                     "to belong to a Dense layer of the chain.")
  estimator = lambda cap, key: kron.kfra_factors(cap, activations, check=check_chain)
  return kronecker_factored(loss, estimator, name="curvax.kfra", **kwargs)
