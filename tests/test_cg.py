"""Conjugate gradient: solutions, iteration counts, stopping rules and saved iterates.

References are independent of ``curvax.cg``: ``jnp.linalg.solve`` on dense matrices, the
textbook numpy CG of ``tests/dense_reference.py`` and closed-form facts (CG ends in at
most as many steps as the matrix has distinct eigenvalues).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax import cg
from tests import dense_reference as ref


def _split(vector):
  """A flat vector as a two-leaf pytree, so CG is exercised on pytrees."""
  vector = jnp.asarray(vector)
  head = vector.size // 3
  return {"a": vector[:head], "b": vector[head:].reshape(-1, 1)}


def _join(tree):
  return np.concatenate([np.asarray(tree["a"]), np.asarray(tree["b"]).reshape(-1)])


def _matvec(matrix):
  """A dense matrix as an operator on the two-leaf pytrees of :func:`_split`."""
  matrix = jnp.asarray(matrix)
  return lambda tree: _split(matrix @ jnp.concatenate([tree["a"], tree["b"].reshape(-1)]))


def _solve(matrix, b, x0=None, **kwargs):
  """``curvax.cg.conjugate_gradient`` on a dense matrix, jitted, on two-leaf pytrees."""
  b = _split(b)
  x0 = optax.tree.zeros_like(b) if x0 is None else _split(x0)
  preconditioner = kwargs.pop("preconditioner_matrix", None)
  if preconditioner is not None:
    kwargs["preconditioner"] = _matvec(preconditioner)
  return jax.jit(lambda b, x0: cg.conjugate_gradient(_matvec(matrix), b, x0, **kwargs))(
      b, x0)


def _schedule(max_iters, growth=1.3):
  """``⌈γ^j⌉ ≤ max_iters``, without duplicates, computed here from the definition."""
  points, j = [], 0
  while math.ceil(growth ** j) <= max_iters:
    if math.ceil(growth ** j) not in points:
      points.append(math.ceil(growth ** j))
    j += 1
  return points


def _martens_stop(objectives, *, min_iters, tol, window=0.1):
  """First ``i`` at which Martens' relative-progress rule holds, or ``None``."""
  for i in range(1, len(objectives)):
    k = max(min_iters, math.ceil(window * i))
    phi, previous = objectives[i], objectives[i - k] if i >= k else None
    if i >= min_iters and i > k and phi < 0 and (phi - previous) / phi < k * tol:
      return i
  return None


def test_solves_damped_ggn_system_of_tiny_mlp():
  """``(G + λI) d = b`` with ``G`` the GGN of a tiny MLP, against a dense solve."""
  with jax.enable_x64(True):
    problem = ref.tiny_mlp()
    dense = ref.mlp_dense(problem.params, problem.x, problem.y)
    n, damping = dense.ggn.shape[0], 0.1
    b_flat = np.random.default_rng(0).normal(size=n)
    expected = np.linalg.solve(dense.ggn + damping * np.eye(n), b_flat)
    _, unravel = ravel_pytree(problem.params)

    @jax.jit
    def solve(params, b):
      lin = curvax.linearize(problem.predict_fn(), params, loss="softmax_cross_entropy",
                             targets=problem.y)
      damped = lambda v: optax.tree.add_scale(lin.ggn_vp(v), damping, v)
      return cg.conjugate_gradient(damped, b, optax.tree.zeros_like(b), max_iters=4 * n,
                                   tol=1e-14, atol=1e-12)

    result = solve(problem.params, unravel(jnp.asarray(b_flat)))
    np.testing.assert_allclose(ref.flat(result.x), expected, rtol=1e-8, atol=1e-10)
    assert 0 < int(result.iterations) < 4 * n
    phi = 0.5 * expected @ (dense.ggn + damping * np.eye(n)) @ expected - b_flat @ expected
    np.testing.assert_allclose(float(result.objective), phi, rtol=1e-8)


@pytest.mark.parametrize("n", [5, 12])
def test_converges_in_at_most_n_iterations_on_spd_quadratic(n):
  with jax.enable_x64(True):
    a = ref.spd_matrix(n, np.linspace(0.2, 2.0, n), seed=n)
    b = np.random.default_rng(n).normal(size=n)
    result = _solve(a, b, max_iters=3 * n, min_iters=3 * n, tol=1e-14,
                    atol=1e-9 * np.linalg.norm(b))
    assert int(result.iterations) <= n
    np.testing.assert_allclose(_join(result.x), np.linalg.solve(a, b), rtol=1e-7)


def test_iterations_bounded_by_number_of_distinct_eigenvalues():
  with jax.enable_x64(True):
    a = ref.spd_matrix(15, [1.0] * 5 + [3.0] * 5 + [10.0] * 5, seed=1)
    b = np.random.default_rng(1).normal(size=15)
    result = _solve(a, b, max_iters=30, atol=1e-10)
    assert int(result.iterations) == 3
    np.testing.assert_allclose(_join(result.x), np.linalg.solve(a, b), rtol=1e-9)


def test_iterates_match_textbook_cg_from_warm_start():
  with jax.enable_x64(True):
    n = 10
    a = ref.spd_matrix(n, np.linspace(0.5, 5.0, n), seed=2)
    rng = np.random.default_rng(2)
    b, x0 = rng.normal(size=n), rng.normal(size=n)
    trace = ref.conjugate_gradient(a, b, x0, iters=4)
    result = _solve(a, b, x0, max_iters=4, min_iters=4, tol=1e-14)
    assert int(result.iterations) == 4
    np.testing.assert_allclose(_join(result.x), trace.iterates[4], rtol=1e-10)
    np.testing.assert_allclose(float(result.objective), trace.objectives[4], rtol=1e-10)


def test_preconditioner():
  """Jacobi-preconditioned iterates match textbook PCG; the exact inverse needs 1 step."""
  with jax.enable_x64(True):
    n = 12
    scales = np.geomspace(1.0, 1e3, n)
    a = ref.spd_matrix(n, np.linspace(1.0, 2.0, n), seed=3) * np.sqrt(np.outer(scales,
                                                                                  scales))
    b = np.random.default_rng(3).normal(size=n)
    jacobi = np.diag(1.0 / np.diag(a))

    trace = ref.conjugate_gradient(a, b, iters=3, m_inv=jacobi)
    three = _solve(a, b, max_iters=3, min_iters=3, tol=1e-14, preconditioner_matrix=jacobi)
    np.testing.assert_allclose(_join(three.x), trace.iterates[3], rtol=1e-9)

    exact = np.linalg.solve(a, b)
    tight = dict(max_iters=40, min_iters=40, tol=1e-14, atol=1e-8)
    plain = _solve(a, b, **tight)
    preconditioned = _solve(a, b, preconditioner_matrix=jacobi, **tight)
    assert int(preconditioned.iterations) < int(plain.iterations)
    np.testing.assert_allclose(_join(preconditioned.x), exact, rtol=1e-7)

    ideal = _solve(a, b, preconditioner_matrix=np.linalg.inv(a), **tight)
    assert int(ideal.iterations) == 1
    np.testing.assert_allclose(_join(ideal.x), exact, rtol=1e-9)


def _slow_problem():
  """60 log-spaced eigenvalues over two decades: CG's progress tails off gradually."""
  n = 60
  a = ref.spd_matrix(n, np.geomspace(1e-2, 1.0, n), seed=4)
  return a, np.random.default_rng(4).normal(size=n)


@pytest.mark.parametrize("tol", [2e-2, 5e-3])
def test_martens_rule_stops_on_slow_progress(tol):
  with jax.enable_x64(True):
    a, b = _slow_problem()
    trace = ref.conjugate_gradient(a, b, iters=45)
    expected = _martens_stop(trace.objectives, min_iters=5, tol=tol)
    assert expected is not None and expected < 45
    result = _solve(a, b, max_iters=45, min_iters=5, tol=tol)
    assert int(result.iterations) == expected
    np.testing.assert_allclose(float(result.objective), trace.objectives[expected],
                               rtol=1e-9)
    exhaustive = _solve(a, b, max_iters=45, min_iters=5, tol=1e-12)
    assert int(exhaustive.iterations) > expected + 5
    assert float(exhaustive.objective) < float(result.objective)


def test_min_iters_delays_martens_rule():
  with jax.enable_x64(True):
    a, b = _slow_problem()
    trace = ref.conjugate_gradient(a, b, iters=45)
    early = _martens_stop(trace.objectives, min_iters=5, tol=1e-2)
    late = _martens_stop(trace.objectives, min_iters=early + 3, tol=1e-2)
    result = _solve(a, b, max_iters=45, min_iters=early + 3, tol=1e-2)
    assert int(result.iterations) == late > early


@pytest.mark.parametrize("max_iters,num_saved", [(20, 16), (18, 16), (20, 3)])
def test_saved_iterates_follow_geometric_schedule(max_iters, num_saved):
  with jax.enable_x64(True):
    n = 30
    a = ref.spd_matrix(n, np.geomspace(0.05, 1.0, n), seed=5)
    b = np.random.default_rng(5).normal(size=n)
    trace = ref.conjugate_gradient(a, b, iters=max_iters)
    result = _solve(a, b, max_iters=max_iters, min_iters=max_iters, tol=1e-14,
                    num_saved=num_saved)
    assert int(result.iterations) == max_iters
    points = _schedule(max_iters)
    if points[-1] != max_iters:
      points.append(max_iters)  # the final iterate is always last
    points = points[-num_saved:]
    assert int(result.num_saved) == len(points)
    saved_a = np.asarray(result.saved["a"])
    saved_b = np.asarray(result.saved["b"]).reshape(num_saved, -1)
    saved = np.concatenate([saved_a, saved_b], axis=1)[num_saved - len(points):]
    for row, i in zip(saved, points):
      np.testing.assert_allclose(row, trace.iterates[i], rtol=1e-8, atol=1e-12)


def test_final_iterate_saved_when_stopped_early():
  with jax.enable_x64(True):
    a = ref.spd_matrix(15, [1.0] * 5 + [3.0] * 5 + [10.0] * 5, seed=1)
    b = np.random.default_rng(1).normal(size=15)
    result = _solve(a, b, max_iters=30, atol=1e-10, num_saved=4)
    # Stopped after 3 iterations: saved are x_1, x_2, x_3 (all on the schedule).
    assert int(result.iterations) == 3 and int(result.num_saved) == 3
    trace = ref.conjugate_gradient(a, b, iters=3)
    last = np.concatenate([np.asarray(result.saved["a"][-1]),
                           np.asarray(result.saved["b"][-1]).reshape(-1)])
    np.testing.assert_allclose(last, trace.iterates[3], rtol=1e-9)
    np.testing.assert_allclose(last, _join(result.x), rtol=0, atol=0)


def test_non_positive_curvature_stops_without_taking_the_step():
  with jax.enable_x64(True):
    n = 8
    a = ref.spd_matrix(n, [3.0, 2.0, 1.5, 1.0, 0.5, -0.2, -0.5, -1.0], seed=6)
    b = np.random.default_rng(6).normal(size=n)
    trace = ref.conjugate_gradient(a, b, iters=n)
    assert trace.negative_curvature
    taken = len(trace.iterates) - 1
    assert taken >= 1
    result = _solve(a, b, max_iters=3 * n, min_iters=3 * n, tol=1e-14, num_saved=4)
    np.testing.assert_allclose(_join(result.x), trace.iterates[taken], rtol=1e-9)
    x = _join(result.x)
    np.testing.assert_allclose(float(result.objective), 0.5 * x @ a @ x - b @ x, rtol=1e-9)
    assert int(result.iterations) == taken
    last = np.concatenate([np.asarray(result.saved["a"][-1]),
                           np.asarray(result.saved["b"][-1]).reshape(-1)])
    np.testing.assert_allclose(last, x, rtol=1e-12)


def test_negative_curvature_on_first_direction_returns_start():
  with jax.enable_x64(True):
    a = np.diag([-1.0, 2.0, 3.0])
    b = np.array([1.0, 0.0, 0.0])
    x0 = np.zeros(3)
    result = _solve(a, b, x0, max_iters=5)
    np.testing.assert_array_equal(_join(result.x), x0)
    assert float(result.objective) == 0.0
    assert int(result.iterations) == 0


def test_rejects_bad_limits():
  b = _split(jnp.ones(3))
  with pytest.raises(ValueError, match="max_iters"):
    cg.conjugate_gradient(lambda v: v, b, b, max_iters=0)
  with pytest.raises(ValueError, match="num_saved"):
    cg.conjugate_gradient(lambda v: v, b, b, num_saved=0)


def test_schedule_helper_matches_definition():
  assert list(cg.backtracking_schedule(50)) == _schedule(50)
