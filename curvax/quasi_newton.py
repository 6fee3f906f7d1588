"""Stochastic quasi-Newton methods whose curvature pairs come from CVP products.

Both solvers step along ``p = −H g`` (``H`` from the limited-memory pair store of
:mod:`curvax.pairs`) and collect a pair every ``pair_period`` steps with ``y = C s``
computed by the shared CVP module on the curvature batch (second_order_comparison.md
§2.2) — no gradient differences, so the pairs are noise-free on their batch:

* :func:`sqn` (Byrd, Hansen, Nocedal & Singer 2016): ``s = w̄_t − w̄_{t−1}`` between
  averages of the iterates of consecutive ``pair_period``-step windows, ``y`` the GGN (or
  Hessian) product at ``w̄_t``; pairs with ``sᵀy ≤ ε sᵀs`` are dropped; L-BFGS two-loop.
* :func:`lsr1` (limited-memory SR1): ``s`` the displacement since the last pair, ``y`` the
  product at the current iterate (reusing the step's linearisation when no separate
  curvature batch is given); the SR1 skipping rule; compact SR1 inverse. SR1 matrices can
  be indefinite: when ``gᵀp ≥ 0`` the step falls back to ``−g``.

Step length. The paper's finding (second_order_comparison.md §3.4, §4.4) is that a
fixed step along ``p`` explodes and these methods need a line search (its Armijo
condition, eq. 2): a unit step on ``p = −g`` before the first pair, or along a poorly
scaled ``−Hg``, diverges on every shipped problem. By default (``step_size="model"``)
the step is ``α p`` with ``α = −gᵀp / pᵀCp``, the exact minimiser along ``p`` of the
step batch's GGN quadratic model (curveball.md eq. 11–12, the 1×1 case of
:func:`curvax.quadratic.minimiser`, as KFAC chooses its step), at the price of one
forward-mode product ``Jp`` on the step's linearisation. ``step_size="fixed"`` is the
paper's setting without a line search (``learning_rate · p``); chain either with
``optax.scale_by_backtracking_linesearch`` for the paper's method (see docs/guides/chains.md) —
with the fixed step the search starts from ``p`` exactly as in the paper.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvax import cvp
from curvax import extra_args as extra_args_lib
from curvax import losses as losses_lib
from curvax import nonfinite
from curvax import pairs
from curvax import quadratic
from curvax._validation import (ScalarOrSchedule, check_in_range, check_positive,
                                static_int, value_at)

PyTree = Any
STEP_SIZES = ("model", "fixed")
_ETA = 1e-4  # a trust-region step is taken when ρ > η (Nocedal & Wright Alg. 6.2)


class QuasiNewtonState(NamedTuple):
  """State of :func:`sqn` and :func:`lsr1`.

  Attributes:
    pairs: the curvature pair store.
    anchor: flattened reference point of the next pair's ``s`` (SQN: the previous window
      average; L-SR1: the iterate at the last pair).
    window_sum: flattened sum of the iterates of the current window (SQN).
    num_windows: completed windows (SQN needs two before its first pair).
    count: steps taken (finite batches only).
    loss: loss at the parameters the last finite step started from.
    num_skipped: batches skipped for non-finite values.
    last_update: flattened update the last step returned (zero after a refused step or
      a rollback): what a rollback reverses.
    trust_radius: ``Δ``, the bound on the length of the model step ``α p`` (before the
      learning rate). With the trust region (L-SR1's default) it follows the reduction
      ratio (Nocedal & Wright Alg. 6.2); without it, it is ``inf`` until a rollback
      halves it and doubles back on every step after.
    reduction_ratio: ``ρ`` of the last trust-region step (NaN without a trust region).
    predicted_change: the model's predicted change ``Δf̂`` of ``last_update`` on the
      batch it was fitted to (NaN when none): the denominator of the next batch's check.
    next_batch_ratio: ``ρ`` of the previous update measured on this step's batch (the
      trust region's next-batch check; NaN when there was none or it is off).
    num_rolled_back: batches whose loss was not finite at the current parameters but
      was before the last update: the update was reversed and ``Δ`` halved
      (:mod:`curvax.nonfinite`).
  """
  pairs: pairs.PairStore
  anchor: jax.Array
  window_sum: jax.Array
  num_windows: jax.Array
  count: jax.Array
  loss: jax.Array
  num_skipped: jax.Array
  last_update: jax.Array
  trust_radius: jax.Array
  reduction_ratio: jax.Array
  num_rolled_back: jax.Array
  predicted_change: jax.Array
  next_batch_ratio: jax.Array


def sqn(loss: "losses_lib.Loss | str", *, learning_rate: ScalarOrSchedule = 1.0,
        step_size: str = "model", memory: Optional[int] = None,
        pair_period: Optional[int] = None,
        curvature: str = "ggn", curvature_batch: bool = False,
        min_curvature: float = 1e-10, trust_region: bool = True,
        trust_radius: Optional[float] = None, check_next_batch: bool = True,
        axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
  """Stochastic L-BFGS with CVP curvature pairs at averaged iterates (Byrd et al. 2016).

  Numeric hyperparameters may be Python, NumPy or 0-d JAX scalars (so
  ``optax.inject_hyperparams(curvax.sqn)(loss=..., learning_rate=...)`` works);
  ``memory`` and ``pair_period`` fix shapes and the pair schedule, so they default to
  ``None`` and are set under ``inject_hyperparams`` only with ``static_args``.

  Args:
    loss: a :class:`curvax.losses.Loss` or its name.
    learning_rate: scales the step (with ``step_size="fixed"``, ``−H g`` itself: the
      paper's setting, where a line search in the chain chooses it); also an
      ``optax.Schedule``, evaluated at ``state.count``.
    step_size: ``"model"`` (default): ``−H g`` times ``α = −gᵀp / pᵀGp``, the minimiser
      along ``p = −H g`` of the step batch's GGN model (see the module docstring): finite
      on every shipped problem where the fixed step diverges, though it still stalls on
      the autoencoder's plateau (``benchmarks/results/defaults_sqn.json``);
      ``"fixed"``: ``α = 1`` (second_order_comparison.md §4.4: diverges without a line
      search).
    memory: number of pairs kept (``None``: 10).
    pair_period: ``L``, steps per averaging window and between pairs (``None``: 10).
    curvature: ``"ggn"`` or ``"hessian"`` for ``y = C s``.
    curvature_batch: compute ``y`` on ``curvature_predict_fn`` / ``curvature_targets``.
    min_curvature: pairs with ``sᵀy ≤ min_curvature · sᵀs`` are dropped.
    trust_region: bound the model step by a radius ``Δ`` following the reduction ratio
      (as :func:`lsr1`; one more forward pass per step). On by default: the model step
      alone took a tiny transformer 6.04 → 5.2·10⁴ in 16 steps, where the GGN model
      along ``p`` misses the attention's curvature (docs/guides/reliability.md).
    trust_radius: initial ``Δ`` (``None``: unbounded until the first shrink).
    check_next_batch: with the trust region, also score each update on the next batch
      and halve ``Δ`` when that ratio is below 0.1 (as :func:`lsr1`).
    axis_name: data-parallel axis (``shard_map`` / ``pmap``); products and the loss are
      averaged over it (see :func:`curvax.linearize`).
  """
  check_in_range("min_curvature", min_curvature, 0, math.inf)

  def accept(store, s, y):
    return jnp.vdot(s, y) > jnp.asarray(min_curvature, s.dtype) * jnp.vdot(s, s)

  memory = static_int("memory", memory, 10)
  pair_period = static_int("pair_period", pair_period, 10)
  return _quasi_newton("sqn", loss, learning_rate, step_size, memory, pair_period,
                       curvature, curvature_batch, pairs.lbfgs_inverse_product, accept,
                       average_iterates=True, descent_fallback=False,
                       trust_region=trust_region, trust_radius=trust_radius,
                       check_next_batch=check_next_batch,
                       axis_name=axis_name)


def lsr1(loss: "losses_lib.Loss | str", *, learning_rate: ScalarOrSchedule = 1.0,
         step_size: str = "model", memory: Optional[int] = None,
         pair_period: Optional[int] = None,
         curvature: str = "ggn", curvature_batch: bool = False,
         skip_tolerance: float = 1e-8, trust_region: bool = True,
         trust_radius: Optional[float] = None, check_next_batch: bool = True,
         axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
  """Limited-memory SR1 with CVP curvature pairs and the standard skipping rule.

  Hyperparameters as in :func:`sqn` (arrays, a ``learning_rate`` schedule, static
  ``memory`` / ``pair_period``), and the same default step length.

  Args:
    loss: a :class:`curvax.losses.Loss` or its name.
    learning_rate: scales the step (with ``step_size="fixed"``, the direction itself:
      the paper's setting, where a line search in the chain chooses it); also an
      ``optax.Schedule``, evaluated at ``state.count``.
    step_size: ``"model"`` (default) or ``"fixed"``, as in :func:`sqn`
      (``benchmarks/results/defaults_lsr1.json``).
    memory: number of pairs kept (``None``: 10).
    pair_period: steps between pairs, ``s`` spans them (``None``: 1).
    curvature: ``"ggn"`` or ``"hessian"`` for ``y = C s``.
    curvature_batch: compute ``y`` on ``curvature_predict_fn`` / ``curvature_targets``.
    skip_tolerance: ``r`` of the skipping rule ``|yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖``.
    trust_region: bound the model step by a radius ``Δ`` that follows the reduction
      ratio ``ρ`` of each step on its batch (Nocedal & Wright Alg. 6.2: refused unless
      ``ρ > 10⁻⁴``; one more forward pass per step) — the safeguard SR1 is used with.
    trust_radius: initial ``Δ`` (``None``: unbounded until the first shrink).
    check_next_batch: with the trust region, also score each update on the next batch
      (one more forward pass) and halve ``Δ`` when that ratio is below 0.1: on small
      batches ``ρ`` on the step's own batch overstates it (the CNN at batch 32, see
      docs/guides/reliability.md). ``False``: Alg. 6.2 alone.
    axis_name: data-parallel axis (``shard_map`` / ``pmap``); products and the loss are
      averaged over it (see :func:`curvax.linearize`).
  """
  check_in_range("skip_tolerance", skip_tolerance, 0, 1)

  def accept(store, s, y):
    return pairs.sr1_accepts(store, s, y, skip_tolerance)

  memory = static_int("memory", memory, 10)
  pair_period = static_int("pair_period", pair_period, 1)
  return _quasi_newton("lsr1", loss, learning_rate, step_size, memory, pair_period,
                       curvature, curvature_batch, pairs.sr1_inverse_product, accept,
                       average_iterates=False, descent_fallback=True,
                       trust_region=trust_region, trust_radius=trust_radius,
                       check_next_batch=check_next_batch,
                       axis_name=axis_name)


def _quasi_newton(name: str, loss, learning_rate: float, step_size: str, memory: int,
                  pair_period: int,
                  curvature: str, curvature_batch: bool,
                  inverse_product: Callable, accept: Callable, *, average_iterates: bool,
                  descent_fallback: bool, trust_region: bool,
                  trust_radius: Optional[float], check_next_batch: bool,
                  axis_name: Optional[str]) -> optax.GradientTransformationExtraArgs:
  loss = losses_lib.get(loss)
  if trust_radius is not None:
    check_positive("trust_radius", trust_radius)
  check_positive("learning_rate", learning_rate, schedule=True)
  if step_size not in STEP_SIZES:
    raise ValueError(f"{name}: step_size must be 'model' or 'fixed', got {step_size!r}.")
  if curvature not in ("ggn", "hessian"):
    raise ValueError(f"{name}: curvature must be 'ggn' or 'hessian', got {curvature!r}.")

  def init_fn(params):
    flat = _wide(ravel_pytree(params)[0])
    return QuasiNewtonState(
        # A copy: a lone 1-D float32 parameter ravels to its own buffer, which a step
        # donating params and state would alias.
        pairs=pairs.empty(memory, flat.size, flat.dtype), anchor=jnp.array(flat, copy=True),
        window_sum=jnp.zeros_like(flat), num_windows=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32), loss=jnp.asarray(jnp.nan, jnp.float32),
        num_skipped=jnp.zeros((), jnp.int32), last_update=jnp.zeros_like(flat),
        trust_radius=jnp.asarray(
            jnp.inf if trust_radius is None else trust_radius, flat.dtype),
        reduction_ratio=jnp.asarray(jnp.nan, jnp.float32),
        num_rolled_back=jnp.zeros((), jnp.int32),
        predicted_change=jnp.asarray(jnp.nan, jnp.float32),
        next_batch_ratio=jnp.asarray(jnp.nan, jnp.float32))

  def update_fn(updates, state, params=None, *, predict_fn=None, targets=None,
                linearization=None, curvature_predict_fn=None, curvature_targets=None,
                **extra_args):
    del extra_args
    lin = extra_args_lib.linearization_from(
        name, loss, params, predict_fn=predict_fn, targets=targets,
        linearization=linearization, axis_name=axis_name)
    if curvature_batch:
      extra_args_lib.check_curvature_batch(name, curvature_predict_fn, curvature_targets)
    param_flat, param_unravel = ravel_pytree(params)
    # Pairs, iterates and directions live in at least float32 (bfloat16 params).
    flat = _wide(param_flat)
    unravel = lambda v: param_unravel(v.astype(param_flat.dtype))
    given = extra_args_lib.given_gradient(name, updates, params)
    grad = lin.grad() if given is None else given
    g = _wide(ravel_pytree(grad)[0])

    def curvature_product(at_flat, s_flat, reuse_step_linearization):
      if reuse_step_linearization:
        return _wide(ravel_pytree(lin.product(curvature)(unravel(s_flat)))[0])
      if curvature_batch:
        fn, tgt = curvature_predict_fn, curvature_targets
      else:
        fn, tgt = lin.predict, lin.targets
      at = cvp.linearize(fn, unravel(at_flat), loss=loss, targets=tgt, axis_name=axis_name)
      return _wide(ravel_pytree(at.product(curvature)(unravel(s_flat)))[0])

    window_sum = state.window_sum + flat
    window_done = (state.count + 1) % pair_period == 0

    def collect(_):
      if average_iterates:
        average = window_sum / pair_period
        s = average - state.anchor
        y = curvature_product(average, s, reuse_step_linearization=False)
        ok = accept(state.pairs, s, y) & (state.num_windows >= 1)
        return pairs.push(state.pairs, s, y, ok), average
      s = flat - state.anchor
      y = curvature_product(flat, s, reuse_step_linearization=not curvature_batch)
      ok = accept(state.pairs, s, y) & (state.count >= 1)
      return pairs.push(state.pairs, s, y, ok), flat

    if pair_period == 1:
      # Every step collects. Calling ``collect`` directly rather than through an
      # always-true ``lax.cond`` keeps the curvature product in the step's main
      # computation: XLA:CPU runs convolutions inside control flow several times slower
      # (jax-ml/jax#12868), ~5x on LeNet.
      store, anchor = collect(None)
    else:
      store, anchor = jax.lax.cond(window_done, collect,
                                   lambda _: (state.pairs, state.anchor), None)
    direction = -inverse_product(store, g)
    if descent_fallback:
      direction = jnp.where(jnp.vdot(g, direction) < 0, direction, -g)
    direction = jnp.where(store.count > 0, direction, -g)
    lr = jnp.asarray(value_at(learning_rate, state.count), direction.dtype)
    radius = state.trust_radius
    fresh_ratio = jnp.asarray(jnp.nan, jnp.float32)
    if trust_region and check_next_batch:
      radius, fresh_ratio = _next_batch_check(lin, params, unravel, state, learning_rate)
    if step_size == "model":
      model = _line_model(lin, g, direction, unravel)
      length = _model_minimiser(model)
    else:
      model, length = None, jnp.ones((), direction.dtype)
    # The model step t p, no longer than Δ (inf: no bound).
    norm = jnp.linalg.norm(direction)
    length = jnp.minimum(length, radius / jnp.where(norm > 0, norm, 1))
    flat_step = lr * length * direction
    ratio = predicted_change = jnp.asarray(jnp.nan, jnp.float32)
    if trust_region:
      if model is None:
        model = _line_model(lin, g, direction, unravel)
      flat_step, radius, ratio, predicted_change = _trust_region_step(
          lin, params, unravel, model, flat_step, lr * length, length * norm, radius)
    else:
      # Without a trust region Δ only bounds the steps after a rollback; it doubles
      # back towards no bound on every step.
      radius = 2 * radius
    step = unravel(flat_step)
    new_state = QuasiNewtonState(
        pairs=store, anchor=anchor,
        window_sum=jnp.where(window_done, jnp.zeros_like(window_sum), window_sum),
        num_windows=state.num_windows + window_done.astype(jnp.int32),
        count=state.count + 1, loss=lin.loss_value.astype(jnp.float32),
        num_skipped=state.num_skipped, last_update=flat_step, trust_radius=radius,
        reduction_ratio=ratio, num_rolled_back=state.num_rolled_back,
        predicted_change=predicted_change, next_batch_ratio=fresh_ratio)
    # The step too: at a landed point the loss can be finite and the model step not.
    finite = nonfinite.all_finite(lin.loss_value, g, direction, store, flat_step)
    rollback = _rollback(state, finite, params, lin, unravel, given)
    return nonfinite.guard(finite, step, new_state, state, rollback=rollback)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _trust_region_step(lin, params, unravel, model, flat_step, scale, model_norm, radius):
  """Nocedal & Wright Alg. 6.2 on the step taken (``flat_step = scale · p``): ``ρ = Δf /
  Δf̂`` on the step's batch (one forward pass), ``model`` the GGN one along ``p``;
  refused unless ``ρ > η``. ``model_norm``: the model step's length, before the
  learning rate. Returns the step (zero if refused), ``Δ``, ``ρ`` and the predicted
  change of an accepted step (NaN otherwise)."""
  predicted = quadratic.predicted_change(model, scale[None])
  trial = lin.loss_at(jax.tree.map(jnp.add, params, unravel(flat_step)))
  ratio = quadratic.reduction_ratio(
      trial.astype(predicted.dtype) - lin.loss_value.astype(predicted.dtype), predicted)
  ratio = jnp.where(jnp.isfinite(ratio), ratio, -jnp.inf)
  # A zero model step (no descent along p) predicts nothing: Δ stays.
  radius = jnp.where(
      (ratio < 0.1) & (model_norm > 0), 0.5 * jnp.minimum(radius, model_norm),
      jnp.where((ratio > 0.75) & (model_norm >= 0.8 * radius), 2 * radius, radius))
  accepted = (ratio > _ETA) & (predicted < 0)
  return (jnp.where(accepted, flat_step, 0), radius, ratio.astype(jnp.float32),
          jnp.where(accepted, predicted, jnp.nan).astype(jnp.float32))


def _rollback(state: QuasiNewtonState, finite, params, lin, unravel, given):
  """A batch that is not finite here but whose loss was before the last update: that
  update landed where the loss overflows. Reverse it and halve Δ — SQN and L-SR1 have no
  damping; the radius is what a refused step shrinks (with no trust region, the step
  after the rollback is at most half the reversed one)."""
  return nonfinite.Rollback(
      due=nonfinite.rollback_due(finite, params, lambda: unravel(state.last_update),
                                 lin.loss_at, given_gradient=given),
      step=unravel(-state.last_update),
      state=state._replace(
          last_update=jnp.zeros_like(state.last_update),
          trust_radius=0.5 * jnp.minimum(state.trust_radius,
                                         jnp.linalg.norm(state.last_update)),
          reduction_ratio=jnp.asarray(-jnp.inf, jnp.float32),
          predicted_change=jnp.asarray(jnp.nan, jnp.float32)))


def _next_batch_check(lin, params, unravel, state, learning_rate):
  """Δ after the last update's ``ρ`` re-measured on this step's batch (one forward pass).

  ``ρ`` on the batch a step was fitted to overstates it on small batches: L-SR1's
  accepted steps on the CNN at batch 32 had ``ρ = 0.5–0.9`` there while the held-out
  loss rose (docs/guides/reliability.md). So the update is also scored on the next,
  independent batch, ``ρ' = (f_B(w) − f_B(w − s)) / Δf̂``, and Δ is halved (to at most
  half the step's model length) when ``ρ' < 0.1`` — the shrink of Nocedal & Wright
  Alg. 6.2 with the ratio of a batch the step never saw, in the spirit of stochastic
  trust regions that estimate the ratio on fresh samples (Chen, Menickelly & Scheinberg
  2018, STORM). Growth still follows the step's own ratio. Returns ``(Δ, ρ')``.
  """
  previous = unravel(-state.last_update)
  before = lin.loss_at(jax.tree.map(jnp.add, params, previous))
  taken = jnp.isfinite(state.predicted_change) & (state.predicted_change < 0)
  fresh = quadratic.reduction_ratio(
      lin.loss_value.astype(jnp.float32) - before.astype(jnp.float32),
      jnp.where(taken, state.predicted_change, -1.0))
  fresh = jnp.where(jnp.isfinite(fresh), fresh, -jnp.inf)
  lr = value_at(learning_rate, jnp.maximum(state.count - 1, 0))
  length = jnp.linalg.norm(state.last_update) / jnp.asarray(lr, state.last_update.dtype)
  radius = jnp.where(taken & (fresh < 0.1), 0.5 * jnp.minimum(state.trust_radius, length),
                     state.trust_radius)
  return radius, jnp.where(taken, fresh, jnp.nan).astype(jnp.float32)


def _line_model(lin, g, direction, unravel) -> quadratic.QuadraticModel:
  """The step batch's GGN model along ``p``: ``f̂(αp) = α gᵀp + ½ α² (Jp)ᵀ H_L (Jp)``."""
  p = unravel(direction)
  return quadratic.build([lin.jvp(p)], [p], output_hvp=lin.output_hvp,
                         gradient_dots=[jnp.vdot(g, direction)],
                         damping=jnp.zeros((), direction.dtype),
                         output_vdot=lin.output_vdot)


def _model_minimiser(model: quadratic.QuadraticModel) -> jax.Array:
  # minimiser() already gives 0 when pᵀCp ≤ 0 (no usable curvature); the maximum keeps
  # an ascent direction (gᵀp > 0) from being taken backwards.
  return jnp.maximum(quadratic.minimiser(model)[0], 0).astype(model.linear.dtype)


def model_step_length(lin: cvp.Linearization, g: jax.Array, direction: jax.Array,
                      unravel: Callable[[jax.Array], PyTree]) -> jax.Array:
  """``α = −gᵀp / pᵀCp``, the minimiser along ``p`` of the step batch's GGN model.

  The 1×1 case of :func:`curvax.quadratic.minimiser` (curveball.md eq. 11–12 with
  ``λ = 0``): ``f̂(αp) = α gᵀp + ½ α² (Jp)ᵀ H_L (Jp)``. One forward-mode product ``Jp``
  on the step's linearisation, no extra forward pass. A direction along which the model
  has no positive curvature (so no minimiser; only possible for a loss that is not
  convex in the outputs) gets ``α = 0``: a zero step rather than a blown-up one.

  Args:
    lin: the step's linearisation.
    g: flattened gradient.
    direction: flattened descent direction ``p``.
    unravel: flat vector to parameter pytree.
  """
  return _model_minimiser(_line_model(lin, g, direction, unravel)).astype(direction.dtype)


def _wide(a: jax.Array) -> jax.Array:
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))
