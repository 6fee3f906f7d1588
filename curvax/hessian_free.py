"""Hessian-free optimisation (Martens 2010) with optional sub-sampled curvature (SHG).

Each step solves the damped Newton system with conjugate gradient on curvature-vector
products of the shared CVP module (second_order_comparison.md §2.1, §3.3):

    (C + λI) δ = −g,     C = GGN (default) or the exact Hessian,

* CG runs inside ``jax.lax.while_loop`` from the warm start ``decay · δ_prev`` and stops
  by Martens' relative-progress rule or ``max_cg_iters`` (:mod:`curvax.cg`);
* CG backtracking: among the saved iterates ``δ_j`` (at ``j = ⌈1.3^k⌉``), walk back from
  the last while the true loss keeps decreasing;
* Levenberg-Marquardt damping from the reduction ratio
  ``ρ = (f(w+δ) − f(w)) / (gᵀδ + ½δᵀCδ)``: ``λ·2/3`` if ``ρ > 3/4``, ``λ·3/2`` if
  ``ρ < 1/4`` — that factor doubling over consecutive failures (3, 6, 12, …: Nielsen's
  escalation, as in Madsen, Nielsen & Tingleff 2004; a departure from Martens 2010,
  ``escalate_damping=False`` restores it); a step is taken only if it lowers the batch
  loss, and a trial point with a non-finite loss counts as ``ρ = −∞`` (refused, ``λ``
  raised) — only a non-finite loss or gradient at the current parameters skips the
  batch — unless the loss was finite before the last update, which is then reversed
  (:mod:`curvax.nonfinite`);
* a step that does not lower the batch loss is line-searched (Armijo backtracking,
  ``optax.scale_by_backtracking_linesearch``; second_order_comparison.md §3.4 uses it
  for SHG) before it is refused: a departure from Martens 2010, which refuses it;
* SHG: with ``curvature_batch=True`` the curvature comes from a separate (smaller) batch
  passed as ``curvature_predict_fn`` / ``curvature_targets`` extra arguments, while the
  gradient uses ``predict_fn`` / ``targets`` (the paper uses a sub-batch of 20%);
* an optional diagonal preconditioner ``(|diag(C)| + λ)^ξ`` with ``diag(C)`` estimated by
  Hutchinson's ``E[v ⊙ Cv]`` (Rademacher ``v``), ``ξ = 0.75`` as in Martens 2010 §4.7.

The linearisations are built once per step: every CG iteration costs one curvature
product on cached residuals, never a new forward pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from curvax import cg
from curvax import cvp
from curvax import extra_args as extra_args_lib
from curvax import losses as losses_lib
from curvax import nonfinite
from curvax import quadratic
from curvax._validation import (ScalarOrSchedule, check_fraction, check_in_range,
                                check_positive, check_within, static_int, value_at)

PyTree = Any


class HessianFreeState(NamedTuple):
  """State of :func:`hessian_free`.

  Attributes:
    direction: the last CG solution, warm start of the next solve.
    damping: ``λ``.
    count: steps taken (batches with a finite loss and gradient; a refused step counts).
    loss: loss at the parameters the last finite step started from.
    reduction_ratio: ``ρ`` of the last step (``−∞`` when its trial loss was not finite:
      the step was refused and ``λ`` raised).
    cg_iterations: CG iterations of the last step.
    num_skipped: batches skipped for non-finite values.
    last_update: the update the last step returned (zero after a refused step or a
      rollback): what a rollback reverses.
    num_rolled_back: batches whose loss was not finite at the current parameters but
      was before the last update: that update was reversed and ``λ`` raised as for a
      refused step (:mod:`curvax.nonfinite`).
    damping_growth: ``ν``, the factor the next failed step (``ρ < 1/4``) multiplies
      ``λ`` by: ``1 / damping_factor`` after a step that did not fail, doubled after
      each failure (with ``escalate_damping``; otherwise always ``1 / damping_factor``).
  """
  direction: PyTree
  damping: jax.Array
  count: jax.Array
  loss: jax.Array
  reduction_ratio: jax.Array
  cg_iterations: jax.Array
  num_skipped: jax.Array
  last_update: PyTree
  num_rolled_back: jax.Array
  damping_growth: jax.Array


# What the shape-fixing integers mean when left at None (see hessian_free's Args).
DEFAULT_MAX_CG_ITERS = 50
DEFAULT_NUM_SAVED = 8
DEFAULT_LINE_SEARCH_STEPS = 30


def hessian_free(loss: "losses_lib.Loss | str", *,
                 learning_rate: ScalarOrSchedule = 1.0, damping: float = 0.1,
                 curvature: str = "ggn", max_cg_iters: Optional[int] = None,
                 min_cg_iters: int = 10, cg_tol: ScalarOrSchedule = 5e-4,
                 warm_start_decay: ScalarOrSchedule = 0.95, backtracking: bool = True,
                 num_saved: Optional[int] = None,
                 damping_factor: ScalarOrSchedule = 2.0 / 3.0,
                 min_damping: ScalarOrSchedule = 1e-8,
                 max_damping: ScalarOrSchedule = 1e8, curvature_batch: bool = False,
                 preconditioner: Optional[str] = None,
                 preconditioner_exponent: float = 0.75,
                 preconditioner_samples: Optional[int] = None,
                 line_search_steps: Optional[int] = None,
                 escalate_damping: bool = True, seed: int = 0,
                 axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
  """Hessian-free as an optax transformation (see the module docstring).

  ``update(updates, state, params, predict_fn=..., targets=...)``; with
  ``curvature_batch=True`` also ``curvature_predict_fn=..., curvature_targets=...``.
  Pass ``None`` as updates to take the gradient from the solver's own linearisation, or
  a gradient (e.g. over a larger batch) to use it instead.

  Numeric hyperparameters may be Python, NumPy or 0-d JAX scalars, so
  ``optax.inject_hyperparams(curvax.hessian_free)(loss=..., learning_rate=...)`` works;
  those marked *schedulable* also accept an ``optax.Schedule``, evaluated at the
  solver's step count ``state.count``. The integers that fix array shapes
  (``max_cg_iters``, ``num_saved``, ``preconditioner_samples``) default to ``None`` so
  that ``inject_hyperparams`` leaves them static; to set one under it, also pass it in
  ``static_args``.

  Args:
    loss: a :class:`curvax.losses.Loss` or its name.
    learning_rate: scales the chosen CG iterate (a line search in the chain can take
      over this role); schedulable.
    damping: initial ``λ``. 0.1, by measurement across the shipped problems
      (``benchmarks/results/defaults_hessian_free.json``, equal update counts): it leaves
      the autoencoder's plateau where λ₀ = 1 stays on it (201.5 vs 206.3 after 20
      updates; 0.01 goes furthest, 187.1), is best on the MLP (0.196 vs 0.289 for 1 and
      0.228 for 0.01) and trains a small transformer in 4 updates where 0.01 has every
      update refused (``tests/test_transformer.py``); on the CNN, where an update costs
      ~20 s on 2 CPU cores, λ₀ = 1 is ahead after 3 updates (2.23 vs 2.43). The LM rule
      moves λ by a factor of at most 3/2 per update, so over a short run λ₀ decides.
    curvature: ``"ggn"`` (PSD, default) or ``"hessian"`` (exact; CG stops at the first
      direction of non-positive curvature).
    max_cg_iters: CG iteration limit (``None``: 50).
    min_cg_iters, cg_tol: Martens' progress rule (``cg_tol`` schedulable).
    warm_start_decay: CG starts from ``decay · δ_prev`` (0 disables warm starts);
      schedulable.
    backtracking: choose among saved CG iterates by the true loss.
    num_saved: how many CG iterates are kept for backtracking (``None``: 8).
    damping_factor: LM factor ``< 1`` (``λ·factor`` when ``ρ > 3/4``, ``λ/factor``
      when ``ρ < 1/4``); schedulable.
    min_damping, max_damping: bounds for ``λ``; schedulable.
    curvature_batch: take curvature products on the ``curvature_predict_fn`` batch.
    preconditioner: ``None`` or ``"diagonal"`` (Hutchinson estimate of ``diag(C)``).
    preconditioner_exponent: ``ξ``.
    preconditioner_samples: Rademacher probes per step for the diagonal (``None``: 1).
    line_search_steps: when the chosen iterate does not lower the batch loss, an Armijo
      backtracking line search along it (``optax.scale_by_backtracking_linesearch``:
      rates 1, 0.8, 0.8², …, sufficient-decrease constant 10⁻⁴; second_order_comparison.md
      §3.4 applies it to every SHG step) tries at most this many rates, one forward pass
      each, and the step is refused (zero) only if none lowers the loss. ``None``: 30
      (down to 0.8³⁰ ≈ 10⁻³); 0: refuse at once (Martens 2010). Without it a transformer
      whose loss rises within the model's trust region had every update refused while
      the LM rule raised λ by 3/2 per update. ``λ`` follows ``ρ`` of the iterate itself.
    escalate_damping: raise ``λ`` by ``ν`` on a failed step (``ρ < 1/4``) and double
      ``ν`` for the next, ``ν = 1/damping_factor`` again after any step that did not
      fail (Nielsen's rule; ``state.damping_growth``). On the CNN at batch 32
      (``benchmarks.defaults_stable --scale 0.25``) ``ρ < 0`` on 13 of the first 14
      updates took λ from 0.1 to 29 at ×3/2 per update while the probe loss climbed
      2.31 → 5.01 in 20 updates; escalating reaches λ ≈ 30 on the 4th failure and the
      run ends at 1.47. ``False``: Martens' fixed factor.
    seed: PRNG seed of the probes (folded with the step count).
    axis_name: data-parallel axis (``shard_map`` / ``pmap``); products, the loss and the
      backtracking / LM statistics are averaged over it (see :func:`curvax.linearize`).
      The diagonal preconditioner's probes are the same on every device.
  """
  loss = losses_lib.get(loss)
  check_positive("learning_rate", learning_rate, schedule=True)
  check_positive("damping", damping)
  check_fraction("damping_factor", damping_factor, schedule=True)
  if curvature not in ("ggn", "hessian"):
    raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}.")
  max_cg_iters = static_int("max_cg_iters", max_cg_iters, DEFAULT_MAX_CG_ITERS)
  num_saved = static_int("num_saved", num_saved, DEFAULT_NUM_SAVED)
  preconditioner_samples = static_int("preconditioner_samples", preconditioner_samples, 1)
  line_search_steps = static_int("line_search_steps", line_search_steps,
                                 DEFAULT_LINE_SEARCH_STEPS, minimum=0)
  check_in_range("min_cg_iters", min_cg_iters, 1, max_cg_iters)
  check_positive("cg_tol", cg_tol, schedule=True)
  check_in_range("warm_start_decay", warm_start_decay, 0, 1, schedule=True)
  check_positive("min_damping", min_damping, schedule=True)
  check_positive("max_damping", max_damping, schedule=True)
  check_in_range("preconditioner_exponent", preconditioner_exponent, 0, 1)
  check_within("damping", damping, min_damping, max_damping)
  if preconditioner not in (None, "diagonal"):
    raise ValueError(f"preconditioner must be None or 'diagonal', got {preconditioner!r}.")

  def init_fn(params):
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return HessianFreeState(
        direction=optax.tree.zeros_like(params), damping=f32(damping),
        count=jnp.zeros((), jnp.int32), loss=f32(jnp.nan), reduction_ratio=f32(jnp.nan),
        cg_iterations=jnp.zeros((), jnp.int32), num_skipped=jnp.zeros((), jnp.int32),
        last_update=optax.tree.zeros_like(params),
        num_rolled_back=jnp.zeros((), jnp.int32),
        damping_growth=f32(1.0 / value_at(damping_factor, 0)))

  def update_fn(updates, state, params=None, *, predict_fn=None, targets=None,
                linearization=None, curvature_predict_fn=None, curvature_targets=None,
                **extra_args):
    del extra_args
    lin = extra_args_lib.linearization_from(
        "hessian_free", loss, params, predict_fn=predict_fn, targets=targets,
        linearization=linearization, axis_name=axis_name)
    curv = lin
    if curvature_batch:
      curv = _curvature_linearization(curvature_predict_fn, curvature_targets, params,
                                      loss=loss, axis_name=axis_name)
    given = extra_args_lib.given_gradient("hessian_free", updates, params)
    grad = lin.grad() if given is None else given
    at_count = lambda value: value_at(value, state.count)
    lr = at_count(learning_rate)
    lam = state.damping.astype(lin.loss_value.dtype)
    product = curv.product(curvature)
    damped = lambda v: optax.tree.add_scale(product(v), lam, v)

    precondition = None
    if preconditioner == "diagonal":
      precondition = _diagonal_preconditioner(
          product, params, lam, jax.random.fold_in(jax.random.PRNGKey(seed), state.count),
          samples=preconditioner_samples, exponent=preconditioner_exponent)

    x0 = _scale(at_count(warm_start_decay), state.direction)
    solve = cg.conjugate_gradient(
        damped, optax.tree.scale(-1.0, grad), x0, max_iters=max_cg_iters,
        min_iters=min_cg_iters, tol=at_count(cg_tol), preconditioner=precondition,
        num_saved=num_saved if backtracking else 1)

    def loss_at(delta):  # NaN counts as +inf, so backtracking walks back past it
      value = lin.loss_at(optax.tree.add(params, _scale(lr, delta)))
      return jnp.where(jnp.isnan(value), jnp.inf, value)

    step, new_loss = _backtrack(solve, loss_at)
    actual = new_loss - lin.loss_value
    step = _scale(lr, step)
    predicted = optax.tree.vdot(grad, step) + 0.5 * optax.tree.vdot(step, product(step))
    ratio = quadratic.reduction_ratio(actual, predicted)
    # A trial point whose loss (or model change) is not finite is the worst outcome, not a
    # bad batch: the step is refused and λ raised as for ρ < 1/4. Skipping the batch
    # instead would leave λ as it was, and the same step would fail again next time.
    ratio = jnp.where(jnp.isfinite(ratio), ratio, -jnp.inf)
    new_damping, growth = damping_rule(state, ratio, at_count)
    # A step that does not decrease the loss on the batch is not taken: a line search
    # along it (line_search_steps) or nothing.
    taken = jnp.isfinite(ratio) & (actual < 0)
    if line_search_steps:
      searched = lambda: _line_search(step, params, grad, lin, line_search_steps)
      step = jax.lax.cond(taken, lambda: step, searched)
    else:
      step = optax.tree.where(taken, step, optax.tree.zeros_like(step))
    new_state = HessianFreeState(
        direction=solve.x, damping=new_damping.astype(jnp.float32), count=state.count + 1,
        loss=lin.loss_value.astype(jnp.float32),
        reduction_ratio=ratio.astype(jnp.float32), cg_iterations=solve.iterations,
        num_skipped=state.num_skipped, last_update=step,
        num_rolled_back=state.num_rolled_back, damping_growth=growth)
    finite = nonfinite.all_finite(lin.loss_value, grad, solve.x)
    raised = damping_rule(state, jnp.asarray(-jnp.inf, jnp.float32), at_count)
    rollback = _rollback(state, finite, params, lin, given, raised)
    return nonfinite.guard(finite, step, new_state, state, rollback=rollback)

  def damping_rule(state, ratio, at_count):
    return _damping_rule(state, ratio, factor=at_count(damping_factor),
                         bounds=(at_count(min_damping), at_count(max_damping)),
                         escalate=escalate_damping)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _curvature_linearization(predict_fn, targets, params, *, loss, axis_name):
  """The ``curvature_batch`` linearisation: SHG's curvature products on their own
  (smaller) batch, the gradient's batch being ``predict_fn``'s."""
  extra_args_lib.check_curvature_batch("hessian_free", predict_fn, targets)
  return cvp.linearize(predict_fn, params, loss=loss, targets=targets,
                       axis_name=axis_name)


def _diagonal_preconditioner(product, params, lam, key, *, samples, exponent):
  """``r ↦ r / (|diag(C)| + λ)^ξ`` with a Hutchinson estimate of ``diag(C)``."""
  diagonal = _hutchinson_diagonal(product, params, key, samples)
  scale = jax.tree.map(lambda d: (jnp.abs(d) + lam) ** exponent, diagonal)
  return lambda r: jax.tree.map(jnp.divide, r, scale)


def _rollback(state: HessianFreeState, finite, params, lin, given, raised):
  """A batch that is not finite here but whose loss was before the last update: that
  update landed where the loss overflows (an outer scaling or a learning-rate spike the
  trial point did not see). Undo it and raise λ as for a refused step (ρ = −∞,
  ``raised``: the damping rule's ``(λ, ν)`` then); the warm start is kept — it was
  computed at the point the rollback returns to."""
  damping, growth = raised
  return nonfinite.Rollback(
      due=nonfinite.rollback_due(finite, params, state.last_update, lin.loss_at,
                                 given_gradient=given),
      step=nonfinite.reverse(state.last_update),
      state=state._replace(damping=damping, damping_growth=growth,
                           reduction_ratio=jnp.asarray(-jnp.inf, jnp.float32),
                           last_update=optax.tree.zeros_like(state.last_update)))


def _damping_rule(state: HessianFreeState, ratio, *, factor, bounds, escalate: bool):
  """``(λ, ν)`` after a step with reduction ratio ``ρ``: Martens' LM rule
  (:func:`curvax.quadratic.levenberg_marquardt`) with ``λ·ν`` when ``ρ < 1/4``, then
  ``ν ← 2ν`` (escalating) — ``ν = 1/factor`` after a step that did not fail."""
  factor = jnp.asarray(factor, jnp.float32)
  failed = ratio < 0.25
  grow = state.damping_growth if escalate else 1.0 / factor
  lam = quadratic.levenberg_marquardt(state.damping, ratio, factor=factor, lower=0.25,
                                      upper=0.75, min_damping=bounds[0],
                                      max_damping=bounds[1], increase=grow)
  growth = jnp.where(failed & escalate, 2.0 * grow, 1.0 / factor)
  return lam.astype(jnp.float32), growth.astype(jnp.float32)


def _line_search(step, params, grad, lin, max_steps):
  """``η·step`` for the first rate ``η ∈ {1, 0.8, 0.8², …}`` with Armijo's sufficient
  decrease on the batch (optax's backtracking line search), or zero if none of
  ``max_steps`` rates lowers the loss (or ``step`` is no descent direction)."""
  search = optax.scale_by_backtracking_linesearch(max_backtracking_steps=max_steps)
  scaled, found = search.update(step, search.init(params), params, value=lin.loss_value,
                                grad=grad, value_fn=lin.loss_at)
  lower = jnp.isfinite(found.value) & (found.value < lin.loss_value)
  descent = optax.tree.vdot(grad, step) < 0
  return optax.tree.where(lower & descent, scaled, optax.tree.zeros_like(step))


def _scale(scalar, tree):
  """``scalar · tree`` in each leaf's dtype (as optax scales by a learning rate): an
  array hyperparameter must not promote bfloat16 leaves."""
  return jax.tree.map(lambda x: jnp.asarray(scalar, x.dtype) * x, tree)


def _backtrack(solve: cg.CGResult, loss_at):
  """Martens' CG backtracking: from the last saved iterate, step back while it helps.

  Returns ``(iterate, loss at it)``.
  """
  num = jax.tree.leaves(solve.saved)[0].shape[0]
  first_valid = num - solve.num_saved
  pick = lambda j: jax.tree.map(lambda s: s[j], solve.saved)

  def cond(carry):
    j, value, previous_value = carry
    return (j > first_valid) & (previous_value < value)

  def body(carry):
    j, _, previous_value = carry
    j = j - 1
    earlier = jnp.where(j > first_valid, loss_at(pick(jnp.maximum(j - 1, 0))), jnp.inf)
    return j, previous_value, earlier

  last = num - 1
  value = loss_at(pick(last))
  previous = jnp.where(last > first_valid, loss_at(pick(last - 1)), jnp.inf)
  j, value, _ = jax.lax.while_loop(cond, body, (jnp.asarray(last), value, previous))
  return pick(j), value


def _hutchinson_diagonal(product, like, key, num_samples):
  """``E[v ⊙ Cv]`` over Rademacher ``v``: an unbiased estimate of ``diag(C)``."""
  def one(k):
    v = optax.tree.random_like(k, like, jax.random.rademacher)
    v = jax.tree.map(lambda a, ref: a.astype(ref.dtype), v, like)
    return jax.tree.map(jnp.multiply, v, product(v))
  samples = [one(k) for k in jax.random.split(key, num_samples)]
  return jax.tree.map(lambda *xs: sum(xs) / num_samples, *samples)
