"""Hessian-free: each rule against dense matrices of a tiny model, in float64.

The references never call curvax: GGN and Hessian come from ``jax.jacobian`` /
``jax.hessian`` on flattened parameters, solves from numpy, CG iterates from the textbook
CG of ``tests/dense_reference.py``, losses from optax.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax.hessian_free import _hutchinson_diagonal
from tests import dense_reference as ref

LOSS = "softmax_cross_entropy"
# line_search_steps=0: a refused step is zero (the line search has its own test).
EXACT = dict(backtracking=False, warm_start_decay=0.0, max_cg_iters=100, min_cg_iters=1,
             cg_tol=1e-15, line_search_steps=0)


_stepper = ref.tiny_mlp_stepper


@functools.lru_cache(maxsize=None)
def _exact_solver():
  """Hessian-free solving to convergence and its jitted step (compiled once, shared)."""
  tx = curvax.hessian_free(LOSS, **EXACT)
  return tx, _stepper(tx)


def _with_damping(tx, params, damping):
  return tx.init(params)._replace(damping=jnp.asarray(damping, jnp.float32))


def _lm(damping, ratio, growth=1.5):
  """Martens' Levenberg-Marquardt rule with the default factor 2/3, a failure's factor
  ``ν`` doubling over consecutive failures (Nielsen): returns ``(λ, ν)``."""
  if ratio > 0.75:
    return damping * 2 / 3, 1.5
  if ratio < 0.25:
    return damping * growth, 2 * growth
  return damping, 1.5


def _ratio(problem, dense, curvature, step):
  """``ρ = (f(w + δ) − f(w)) / (gᵀδ + ½ δᵀCδ)`` from dense matrices."""
  w, unravel = ravel_pytree(problem.params)
  actual = ref.mlp_loss(unravel(w + step), problem.x, problem.y) - dense.value
  return actual / (dense.grad @ step + 0.5 * step @ curvature @ step), actual


def test_direction_solves_damped_system_and_damping_follows_reduction_ratio():
  with jax.enable_x64(True):
    problem = ref.tiny_mlp()
    dense = ref.mlp_dense(problem.params, problem.x, problem.y)
    n = dense.grad.size
    tx, step = _exact_solver()
    branches = set()
    for damping in (1e-4, 1e-2, 1.0, 100.0):
      lam = float(np.float32(damping))
      updates, state = step(problem.params, _with_damping(tx, problem.params, damping),
                            problem.x, problem.y)
      expected = np.linalg.solve(dense.ggn + lam * np.eye(n), -dense.grad)
      np.testing.assert_allclose(ref.flat(state.direction), expected, rtol=1e-6,
                                 atol=1e-8 * np.linalg.norm(expected))
      ratio, actual = _ratio(problem, dense, dense.ggn, expected)
      np.testing.assert_allclose(float(state.reduction_ratio), ratio, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(float(state.damping), _lm(lam, ratio)[0], rtol=1e-6)
      branches.add(np.sign(float(state.damping) - lam))
      # The step is taken only when it lowers the batch loss.
      np.testing.assert_allclose(ref.flat(updates), expected if actual < 0 else 0.0,
                                 rtol=1e-6, atol=1e-8 * np.linalg.norm(expected))
      np.testing.assert_allclose(float(state.loss), dense.value, rtol=1e-6)
      assert int(state.count) == 1 and int(state.num_skipped) == 0
    assert branches == {-1.0, 1.0}, "both branches of the LM rule must be exercised"


def test_damping_trajectory_follows_the_lm_rule_and_refuses_uphill_steps():
  """Eight steps from a small λ, each against the dense damped Newton step at the
  current parameters: the first steps go uphill and are refused (parameters kept, λ
  raised, by a factor that doubles over consecutive refusals), later ones are taken, and
  λ follows Martens' rule from the measured ratios through all three branches."""
  with jax.enable_x64(True):
    problem = ref.tiny_mlp()
    tx, step = _exact_solver()
    params, state = problem.params, _with_damping(tx, problem.params, 0.03)
    _, unravel = ravel_pytree(params)
    refused, branches, growth, escalated = 0, set(), 1.5, False
    for t in range(8):
      lam = float(state.damping)
      dense = ref.mlp_dense(params, problem.x, problem.y)
      expected = np.linalg.solve(dense.ggn + lam * np.eye(dense.grad.size), -dense.grad)
      ratio, actual = _ratio(ref.TinyMLP(params, problem.x, problem.y), dense, dense.ggn,
                             expected)
      updates, state = step(params, state, problem.x, problem.y)
      np.testing.assert_allclose(float(state.reduction_ratio), ratio, rtol=1e-5,
                                 err_msg=f"step {t}")
      expected_lam, next_growth = _lm(lam, ratio, growth)
      np.testing.assert_allclose(float(state.damping), expected_lam, rtol=1e-6,
                                 err_msg=f"step {t}")
      np.testing.assert_allclose(float(state.damping_growth), next_growth, err_msg=f"step {t}")
      escalated |= growth > 1.5 and ratio < 0.25
      growth = next_growth
      branches.add(np.sign(float(state.damping) - lam))
      if actual >= 0:
        refused += 1
        assert not np.any(ref.flat(updates)), f"step {t}: an uphill step was taken"
      else:
        np.testing.assert_allclose(ref.flat(updates), expected, rtol=1e-6,
                                   atol=1e-9 * np.linalg.norm(expected))
      params = optax.apply_updates(params, updates)
    assert refused >= 2 and branches == {-1.0, 0.0, 1.0}, (refused, branches)
    assert escalated, "a second consecutive failure must raise λ by the doubled factor"


def test_refused_step_is_line_searched():
  """From a small λ the damped Newton step goes uphill: the update is the step scaled by
  the first rate 0.8ᵏ with Armijo's sufficient decrease (c = 1e-4), found from dense
  matrices; λ still follows ρ of the full step."""
  with jax.enable_x64(True):
    problem = ref.tiny_mlp()
    tx = curvax.hessian_free(LOSS, **dict(EXACT, line_search_steps=30))
    step = _stepper(tx)
    w, unravel = ravel_pytree(problem.params)
    state = _with_damping(tx, problem.params, 0.03)
    lam = float(state.damping)
    dense = ref.mlp_dense(problem.params, problem.x, problem.y)
    expected = np.linalg.solve(dense.ggn + lam * np.eye(w.size), -dense.grad)
    ratio, actual = _ratio(problem, dense, dense.ggn, expected)
    assert actual > 0, "the problem must give an uphill step at this λ"
    loss = lambda v: float(ref.mlp_loss(unravel(w + v), problem.x, problem.y))
    slope = dense.grad @ expected
    rate = next(0.8 ** k for k in range(30)
                if loss(0.8 ** k * expected) <= dense.value + 1e-4 * 0.8 ** k * slope)
    assert rate < 1
    updates, state = step(problem.params, state, problem.x, problem.y)
    np.testing.assert_allclose(ref.flat(updates), rate * expected, rtol=1e-6)
    np.testing.assert_allclose(float(state.damping), _lm(lam, ratio)[0], rtol=1e-6)


def test_given_gradient_replaces_the_solver_gradient():
  with jax.enable_x64(True):
    problem = ref.tiny_mlp()
    dense = ref.mlp_dense(problem.params, problem.x, problem.y)
    other = ref.tiny_mlp(seed=7)          # a gradient from another batch
    other_grad = ref.mlp_dense(problem.params, other.x, other.y).grad
    tx = curvax.hessian_free(LOSS, **EXACT)
    _, unravel = ravel_pytree(problem.params)
    _, state = _stepper(tx)(
        problem.params, _with_damping(tx, problem.params, 0.1), problem.x, problem.y,
        grad=unravel(jnp.asarray(other_grad)))
    lam = float(np.float32(0.1))
    expected = np.linalg.solve(dense.ggn + lam * np.eye(other_grad.size), -other_grad)
    np.testing.assert_allclose(ref.flat(state.direction), expected, rtol=1e-6)


def test_warm_start_reuses_decayed_previous_direction():
  """One CG step from ``decay · δ_prev``, computed by hand on the dense damped GGN."""
  with jax.enable_x64(True):
    problem = ref.tiny_mlp()
    dense = ref.mlp_dense(problem.params, problem.x, problem.y)
    n, decay, lam = dense.grad.size, 0.5, 0.5
    tx = curvax.hessian_free(LOSS, max_cg_iters=1, min_cg_iters=1, backtracking=False,
                             warm_start_decay=decay)
    w, unravel = ravel_pytree(problem.params)
    previous = 0.3 * np.random.default_rng(0).normal(size=n)
    state = _with_damping(tx, problem.params, lam)._replace(
        direction=unravel(jnp.asarray(previous)))
    _, new_state = _stepper(tx)(problem.params, state, problem.x, problem.y)

    a = dense.ggn + lam * np.eye(n)

    def one_cg_step(x0):
      r = -dense.grad - a @ x0
      return x0 + (r @ r) / (r @ a @ r) * r

    warm, cold = one_cg_step(decay * previous), one_cg_step(np.zeros(n))
    np.testing.assert_allclose(ref.flat(new_state.direction), warm, rtol=1e-9)
    assert np.linalg.norm(warm - cold) > 0.1 * np.linalg.norm(cold)
    assert int(new_state.cg_iterations) == 1


def _schedule(max_iters):
  points = sorted({math.ceil(1.3 ** j) for j in range(64) if math.ceil(1.3 ** j) <= max_iters})
  return points if points[-1] == max_iters else points + [max_iters]


@pytest.mark.parametrize("seed,sub,damping", [(0, 3, 0.01), (0, 4, 0.03), (4, 4, 0.1)])
def test_backtracking_walks_back_while_true_loss_falls(seed, sub, damping):
  """SHG setting: CG on a small curvature batch overshoots on the gradient batch."""
  with jax.enable_x64(True):
    problem = ref.tiny_mlp(seed=seed)
    max_iters = 7
    tx = curvax.hessian_free(LOSS, curvature_batch=True, warm_start_decay=0.0,
                             max_cg_iters=max_iters, min_cg_iters=max_iters, num_saved=16)
    updates, state = _stepper(tx, curvature_batch=True)(
        problem.params, _with_damping(tx, problem.params, damping), problem.x, problem.y,
        problem.x[:sub], problem.y[:sub])

    dense = ref.mlp_dense(problem.params, problem.x, problem.y)
    curvature = ref.mlp_dense(problem.params, problem.x[:sub], problem.y[:sub]).ggn
    lam = float(np.float32(damping))
    trace = ref.conjugate_gradient(curvature + lam * np.eye(dense.grad.size), -dense.grad,
                                   iters=max_iters)
    w, unravel = ravel_pytree(problem.params)
    points = _schedule(max_iters)
    losses = [ref.mlp_loss(unravel(w + trace.iterates[i]), problem.x, problem.y)
              for i in points]
    j = len(points) - 1
    while j > 0 and losses[j - 1] < losses[j]:
      j -= 1
    assert j < len(points) - 1, "the reference must walk back for this test to bite"
    expected = trace.iterates[points[j]] if losses[j] < dense.value else np.zeros(w.size)
    np.testing.assert_allclose(ref.flat(updates), expected, rtol=1e-7, atol=1e-10)
    # The warm start keeps the final CG iterate, not the backtracked one.
    np.testing.assert_allclose(ref.flat(state.direction), trace.iterates[max_iters],
                               rtol=1e-7)


def test_converges_on_convex_quadratic_within_n_cg_iterations():
  """Linear least squares: one HF step with ``n`` CG iterations lands on the minimiser."""
  with jax.enable_x64(True):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (20, 4), jnp.float64)
    targets = jax.random.normal(k2, (20, 2), jnp.float64)
    params = {"w": jax.random.normal(k3, (4, 2), jnp.float64), "b": jnp.zeros(2)}
    n = 10
    predict = lambda p: x @ p["w"] + p["b"]
    tx = curvax.hessian_free("squared_error", damping=1e-9, min_damping=1e-12,
                             max_cg_iters=n, min_cg_iters=n, backtracking=False,
                             warm_start_decay=0.0)
    step = jax.jit(lambda p, s: tx.update(None, s, p, predict_fn=predict, targets=targets))
    design = np.concatenate([np.asarray(x), np.ones((20, 1))], axis=1)
    solution = np.linalg.lstsq(design, np.asarray(targets), rcond=None)[0]
    minimum = ref.squared_error(design @ solution, targets)
    state, losses = tx.init(params), []
    for _ in range(3):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
      losses.append(float(ref.squared_error(predict(params), targets)))
      assert int(state.cg_iterations) <= n
    np.testing.assert_allclose(np.asarray(params["w"]), solution[:4], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(params["b"]), solution[4], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(losses, float(minimum), rtol=1e-10)


def test_exact_hessian_curvature():
  with jax.enable_x64(True):
    problem = ref.tiny_mlp()
    dense = ref.mlp_dense(problem.params, problem.x, problem.y)
    n = dense.grad.size
    smallest = np.linalg.eigvalsh(dense.hessian)[0]
    assert smallest < 0, "the test point must have negative curvature"
    tx = curvax.hessian_free(LOSS, curvature="hessian", **EXACT)
    step = _stepper(tx)

    # Damped enough to be positive definite: the exact damped Newton step.
    lam = float(np.float32(0.5 - smallest))
    _, state = step(problem.params, _with_damping(tx, problem.params, lam), problem.x,
                    problem.y)
    expected = np.linalg.solve(dense.hessian + lam * np.eye(n), -dense.grad)
    np.testing.assert_allclose(ref.flat(state.direction), expected, rtol=1e-6)
    ratio, _ = _ratio(problem, dense, dense.hessian, expected)
    np.testing.assert_allclose(float(state.reduction_ratio), ratio, rtol=1e-4, atol=1e-6)

    # Barely damped: CG stops at the first direction of negative curvature.
    lam = float(np.float32(1e-3))
    _, state = step(problem.params, _with_damping(tx, problem.params, lam), problem.x,
                    problem.y)
    trace = ref.conjugate_gradient(dense.hessian + lam * np.eye(n), -dense.grad, iters=100)
    assert trace.negative_curvature
    np.testing.assert_allclose(ref.flat(state.direction), trace.iterates[-1], rtol=1e-8,
                               atol=1e-12)
    assert int(state.cg_iterations) == len(trace.iterates) - 1


def test_shg_curvature_comes_from_the_curvature_batch():
  with jax.enable_x64(True):
    problem = ref.tiny_mlp(batch=10)
    sub = 2
    tx = curvax.hessian_free(LOSS, curvature_batch=True, **EXACT)
    lam = float(np.float32(0.1))
    _, state = _stepper(tx, curvature_batch=True)(
        problem.params, _with_damping(tx, problem.params, lam), problem.x, problem.y,
        problem.x[:sub], problem.y[:sub])
    full = ref.mlp_dense(problem.params, problem.x, problem.y)
    curvature = ref.mlp_dense(problem.params, problem.x[:sub], problem.y[:sub]).ggn
    n = full.grad.size
    expected = np.linalg.solve(curvature + lam * np.eye(n), -full.grad)
    full_batch = np.linalg.solve(full.ggn + lam * np.eye(n), -full.grad)
    assert np.linalg.norm(expected - full_batch) > 0.1 * np.linalg.norm(full_batch)
    np.testing.assert_allclose(ref.flat(state.direction), expected, rtol=1e-6)
    ratio, _ = _ratio(problem, full, curvature, expected)
    np.testing.assert_allclose(float(state.reduction_ratio), ratio, rtol=1e-4, atol=1e-6)


def test_shg_without_curvature_arguments_raises():
  problem = ref.tiny_mlp(jnp.float32)
  tx = curvax.hessian_free(LOSS, curvature_batch=True)
  state = tx.init(problem.params)
  with pytest.raises(ValueError, match="curvature_predict_fn"):
    tx.update(None, state, problem.params, predict_fn=problem.predict_fn(),
              targets=problem.y)
  with pytest.raises(ValueError, match="curvature_targets"):
    tx.update(None, state, problem.params, predict_fn=problem.predict_fn(),
              targets=problem.y, curvature_predict_fn=problem.predict_fn())


def test_non_finite_batch_is_skipped_and_steps_do_not_retrace():
  problem = ref.tiny_mlp(jnp.float32)
  tx = curvax.hessian_free(LOSS, max_cg_iters=5, min_cg_iters=2)
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    updates, state = tx.update(None, state, params,
                               predict_fn=lambda p: ref.TinyMLP.predict(p, x), targets=y)
    return optax.apply_updates(params, updates), updates, state

  params, state = problem.params, tx.init(problem.params)
  for i in range(3):
    x = problem.x + 0.01 * i
    params, _, state = step(params, state, x, problem.y)
  bad_x = problem.x.at[0, 0].set(jnp.nan)
  new_params, updates, new_state = step(params, state, bad_x, problem.y)
  assert len(traces) == 1
  ref.assert_batch_skipped(new_params, updates, new_state, params, state)
  assert int(new_state.count) == 3


def _rademacher_probes(params, seed, count, samples):
  """The probes of HF's Hutchinson estimate at step ``count``, flattened."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), count)
  return [ref.flat(optax.tree.random_like(k, params, jax.random.rademacher))
          for k in jax.random.split(key, samples)]


def test_hutchinson_diagonal_on_a_non_diagonal_operator():
  """``mean_k v_k ⊙ A v_k`` for the same probes, computed on the dense matrix; its
  off-diagonal part makes every probe count."""
  with jax.enable_x64(True):
    params = ref.tiny_mlp().params
    w, unravel = ravel_pytree(params)
    a = ref.spd_matrix(w.size, np.linspace(0.1, 3.0, w.size), seed=1)
    product = lambda v: unravel(jnp.asarray(a) @ ravel_pytree(v)[0])
    key = jax.random.fold_in(jax.random.PRNGKey(3), 0)
    estimate = ref.flat(_hutchinson_diagonal(product, params, key, 3))
    probes = _rademacher_probes(params, 3, 0, 3)
    np.testing.assert_allclose(estimate, np.mean([v * (a @ v) for v in probes], axis=0),
                               rtol=1e-12)
    assert np.max(np.abs(estimate - np.diag(a))) > 0.1


def test_diagonal_preconditioner_iterates_match_dense_preconditioned_cg():
  """Three CG steps (not converged, so the preconditioner shapes the iterate) against
  textbook PCG on the dense damped GGN with ``M = (|d| + λ)^ξ``, ``d`` the Hutchinson
  estimate from the same probes on the dense GGN."""
  with jax.enable_x64(True):
    problem = ref.tiny_mlp()
    dense = ref.mlp_dense(problem.params, problem.x, problem.y)
    lam, xi, samples = float(np.float32(0.1)), 0.75, 2
    tx = curvax.hessian_free(LOSS, preconditioner="diagonal", preconditioner_samples=samples,
                             preconditioner_exponent=xi, backtracking=False,
                             warm_start_decay=0.0, max_cg_iters=3, min_cg_iters=3,
                             cg_tol=1e-15, seed=5)
    _, state = _stepper(tx)(problem.params, _with_damping(tx, problem.params, lam),
                            problem.x, problem.y)
    probes = _rademacher_probes(problem.params, 5, 0, samples)
    diagonal = np.mean([v * (dense.ggn @ v) for v in probes], axis=0)
    m_inv = np.diag(1.0 / (np.abs(diagonal) + lam) ** xi)
    a = dense.ggn + lam * np.eye(dense.grad.size)
    preconditioned = ref.conjugate_gradient(a, -dense.grad, iters=3, m_inv=m_inv)
    plain = ref.conjugate_gradient(a, -dense.grad, iters=3)
    assert int(state.cg_iterations) == 3
    np.testing.assert_allclose(ref.flat(state.direction), preconditioned.iterates[3],
                               rtol=1e-8)
    gap = np.linalg.norm(preconditioned.iterates[3] - plain.iterates[3])
    assert gap > 0.05 * np.linalg.norm(plain.iterates[3]), gap


@pytest.mark.parametrize("name,value", [
    ("learning_rate", 0.0), ("damping", -1.0), ("curvature", "fisher"),
    ("max_cg_iters", 0), ("min_cg_iters", 100), ("cg_tol", 0.0), ("warm_start_decay", 1.5),
    ("num_saved", 0), ("damping_factor", 1.5), ("preconditioner", "jacobi"),
    ("preconditioner_samples", 0), ("line_search_steps", -1)])
def test_bad_configuration_names_the_argument(name, value):
  with pytest.raises(ValueError, match=name):
    curvax.hessian_free(LOSS, **{name: value})


def test_non_finite_trial_loss_refuses_the_step_and_raises_damping():
  """``f(w) = (log w − t)²``: the Gauss-Newton step ``δ = −g / (G + λ)`` overshoots
  ``w = 1`` into ``w < 0`` (a NaN loss) until λ has grown enough. Each such step is
  refused with λ raised (by 3/2, 3, 6, … over consecutive refusals; the batch is not
  skipped), so training goes on."""
  with jax.enable_x64(True):
    target, lam = -3.0, 1.0
    params = {"w": jnp.ones((1,), jnp.float64)}
    predict = lambda p: jnp.broadcast_to(jnp.log(p["w"]), (4, 1))
    targets = jnp.full((4, 1), target)
    tx = curvax.hessian_free("squared_error", damping=lam, min_cg_iters=1,
                             line_search_steps=0)
    step = jax.jit(lambda p, s: tx.update(None, s, p, predict_fn=predict, targets=targets))
    state, w, refused, growth = tx.init(params), 1.0, 0, 1.5
    for t in range(6):
      updates, state = step(params, state)
      residual = math.log(w) - target
      grad, ggn = 2 * residual / w, 2 / w ** 2
      delta = -grad / (ggn + lam)
      assert int(state.count) == t + 1 and int(state.num_skipped) == 0
      if w + delta <= 0:
        refused += 1
        assert float(updates["w"][0]) == 0.0
        assert float(state.reduction_ratio) == -np.inf
        lam, growth = _lm(lam, -np.inf, growth)
      else:
        np.testing.assert_allclose(float(updates["w"][0]), delta, rtol=1e-10)
        actual = (math.log(w + delta) - target) ** 2 - residual ** 2
        ratio = actual / (grad * delta + 0.5 * ggn * delta ** 2)
        np.testing.assert_allclose(float(state.reduction_ratio), ratio, rtol=1e-5)
        lam, growth = _lm(lam, ratio, growth)
        w += delta
      np.testing.assert_allclose(float(state.damping), lam, rtol=1e-6)
      lam = float(state.damping)
      params = optax.apply_updates(params, updates)
    # Two refusals (λ ×1.5, then ×3) reach a λ whose steps stay in w > 0; they then
    # converge to w = exp(target).
    assert refused == 2 and abs(math.log(w) - target) < 1e-3, (refused, w)
