"""The shared quadratic model against numpy: Gram matrices, solves, ratios, LM rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvax import quadratic
from tests.conftest import tolerance

NUM_OUTPUTS, NUM_PARAMS = 7, 6


def _problem(seed):
  """A dense ``J`` (outputs × params), SPD ``H_L``, gradient ``g`` and the GGN ``C``."""
  rng = np.random.default_rng(seed)
  jac = rng.normal(size=(NUM_OUTPUTS, NUM_PARAMS))
  root = rng.normal(size=(NUM_OUTPUTS, NUM_OUTPUTS))
  output_hessian = root @ root.T / NUM_OUTPUTS + 0.1 * np.eye(NUM_OUTPUTS)
  grad = rng.normal(size=NUM_PARAMS)
  return jac, output_hessian, grad, jac.T @ output_hessian @ jac


def _as_tree(vector, dtype):
  """A parameter-space vector as a two-leaf pytree (the model sees pytrees)."""
  vector = jnp.asarray(vector, dtype)
  return {"a": vector[:2].reshape(2, 1), "b": vector[2:]}


def _model(jac, output_hessian, grad, directions, damping, dtype):
  """``quadratic.build`` fed with ``J d_i``, pytree ``d_i``, ``H_L u`` and ``gᵀd_i``."""
  hessian = jnp.asarray(output_hessian, dtype)
  return quadratic.build(
      [jnp.asarray(jac @ d, dtype) for d in directions],
      [_as_tree(d, dtype) for d in directions],
      output_hvp=lambda u: hessian @ u,
      gradient_dots=[jnp.asarray(grad @ d, dtype) for d in directions],
      damping=jnp.asarray(damping, dtype))


def _reference(ggn, grad, directions, damping):
  """Numpy Gram matrices ``Dᵀ C D``, ``Dᵀ (C + λI) D`` and ``Dᵀ g``."""
  d = np.stack(directions, axis=1)
  curvature = d.T @ ggn @ d
  damped = d.T @ (ggn + damping * np.eye(ggn.shape[0])) @ d
  return curvature, damped, d.T @ grad


@pytest.mark.parametrize("num_directions", [1, 2, 3])
def test_build_matches_dense_gram_matrices(num_directions, dtype):
  jac, output_hessian, grad, ggn = _problem(0)
  rng = np.random.default_rng(1)
  directions = [rng.normal(size=NUM_PARAMS) for _ in range(num_directions)]
  model = _model(jac, output_hessian, grad, directions, 0.3, dtype)
  curvature, damped, linear = _reference(ggn, grad, directions, 0.3)
  tol = tolerance(dtype)
  np.testing.assert_allclose(model.curvature, curvature, **tol)
  np.testing.assert_allclose(model.damped, damped, **tol)
  np.testing.assert_allclose(model.linear, linear, **tol)
  assert model.damped.shape == (num_directions, num_directions)
  assert model.damped.dtype == dtype


@pytest.mark.parametrize("num_directions", [1, 2, 3])
def test_minimiser_solves_damped_normal_equations(num_directions):
  """``x = −M⁻¹ b`` and the step ``Σ x_i d_i`` beats every perturbed combination."""
  with jax.enable_x64(True):
    jac, output_hessian, grad, ggn = _problem(2)
    rng = np.random.default_rng(3)
    directions = [rng.normal(size=NUM_PARAMS) for _ in range(num_directions)]
    damping = 0.05
    model = _model(jac, output_hessian, grad, directions, damping, jnp.float64)
    _, damped, linear = _reference(ggn, grad, directions, damping)
    got = np.asarray(quadratic.minimiser(model))
    np.testing.assert_allclose(got, -np.linalg.solve(damped, linear), rtol=1e-9)

    def damped_model(x):  # f̂ of the parameter step Σ x_i d_i, written in full
      step = np.stack(directions, axis=1) @ x
      return grad @ step + 0.5 * step @ (ggn + damping * np.eye(NUM_PARAMS)) @ step

    best = damped_model(got)
    for _ in range(5):
      assert damped_model(got + 1e-3 * rng.normal(size=num_directions)) > best
    np.testing.assert_allclose(
        quadratic.predicted_change(model, jnp.asarray(got), damped=True), best,
        rtol=1e-9)


def test_curveball_directions_reproduce_eq_19():
  """Directions ``{Δz, z}``: the coefficients are ``[−β, ρ]`` of curveball.md eq. 19."""
  with jax.enable_x64(True):
    jac, output_hessian, grad, ggn = _problem(4)
    damping = 0.7
    z = np.random.default_rng(5).normal(size=NUM_PARAMS)
    damped_ggn = ggn + damping * np.eye(NUM_PARAMS)
    delta = damped_ggn @ z + grad
    model = _model(jac, output_hessian, grad, [delta, z], damping, jnp.float64)
    matrix = np.array([[delta @ damped_ggn @ delta, z @ damped_ggn @ delta],
                       [z @ damped_ggn @ delta, z @ damped_ggn @ z]])
    neg_beta, rho = -np.linalg.inv(matrix) @ np.array([grad @ delta, grad @ z])
    np.testing.assert_allclose(quadratic.minimiser(model), [neg_beta, rho], rtol=1e-9)


def test_degenerate_direction_drops_out():
  """``z = 0`` (CurveBall's first step): the pseudo-inverse gives ρ = 0 and the 1-D β."""
  with jax.enable_x64(True):
    jac, output_hessian, grad, ggn = _problem(6)
    damping = 0.2
    delta = np.random.default_rng(7).normal(size=NUM_PARAMS)
    zero = np.zeros(NUM_PARAMS)
    model = _model(jac, output_hessian, grad, [delta, zero], damping, jnp.float64)
    x = np.asarray(quadratic.minimiser(model))
    assert np.all(np.isfinite(x))
    line_curvature = delta @ (ggn + damping * np.eye(NUM_PARAMS)) @ delta
    np.testing.assert_allclose(x, [-(grad @ delta) / line_curvature, 0.0], rtol=1e-9,
                               atol=1e-12)


def test_collinear_directions_give_the_one_dimensional_optimum():
  """Directions ``d`` and ``2d``: the step is the 1-D optimum along ``d``, with the
  coefficients minimum-norm in the Jacobi-scaled basis (``d`` and ``2d`` count equally)."""
  with jax.enable_x64(True):
    jac, output_hessian, grad, ggn = _problem(8)
    damping = 0.1
    d = np.random.default_rng(9).normal(size=NUM_PARAMS)
    model = _model(jac, output_hessian, grad, [d, 2 * d], damping, jnp.float64)
    x = np.asarray(quadratic.minimiser(model))
    best_scale = -(grad @ d) / (d @ (ggn + damping * np.eye(NUM_PARAMS)) @ d)
    np.testing.assert_allclose(x[0] + 2 * x[1], best_scale, rtol=1e-7)
    np.testing.assert_allclose(x[0], 2 * x[1], rtol=1e-7)  # equal shares of the step


@pytest.mark.parametrize("seed", range(5))
def test_nearly_collinear_directions_in_float32_are_not_fitted_to_noise(seed):
  """``d`` and ``1.1 d`` in float32: rounding makes ``M`` look invertible; the solve must
  still give the 1-D optimum along ``d`` with bounded coefficients (minimum-norm in the
  Jacobi-scaled basis, where ``d`` and ``1.1 d`` take equal shares)."""
  jac, output_hessian, grad, ggn = _problem(8)
  damping = 0.1
  d = np.random.default_rng(seed).normal(size=NUM_PARAMS)
  model = _model(jac, output_hessian, grad, [d, 1.1 * d], damping, jnp.float32)
  x = np.asarray(quadratic.minimiser(model), np.float64)
  damped = ggn + damping * np.eye(NUM_PARAMS)
  best_scale = -(grad @ d) / (d @ damped @ d)
  np.testing.assert_allclose(x[0] + 1.1 * x[1], best_scale, rtol=1e-4)
  np.testing.assert_allclose(x[0], 1.1 * x[1], rtol=1e-4)


def test_zero_directions_give_zero_coefficients():
  with jax.enable_x64(True):
    jac, output_hessian, grad, _ = _problem(10)
    zero = np.zeros(NUM_PARAMS)
    model = _model(jac, output_hessian, grad, [zero, zero], 0.5, jnp.float64)
    np.testing.assert_array_equal(quadratic.minimiser(model), [0.0, 0.0])


def test_predicted_change_undamped_and_damped(dtype):
  jac, output_hessian, grad, ggn = _problem(11)
  rng = np.random.default_rng(12)
  directions = [rng.normal(size=NUM_PARAMS) for _ in range(2)]
  damping = 0.4
  model = _model(jac, output_hessian, grad, directions, damping, dtype)
  x = rng.normal(size=2)
  step = np.stack(directions, axis=1) @ x
  undamped = grad @ step + 0.5 * step @ ggn @ step
  damped = undamped + 0.5 * damping * step @ step
  tol = tolerance(dtype)
  xs = jnp.asarray(x, dtype)
  np.testing.assert_allclose(quadratic.predicted_change(model, xs), undamped, **tol)
  np.testing.assert_allclose(quadratic.predicted_change(model, xs, damped=True), damped,
                             **tol)


@pytest.mark.parametrize("actual, predicted", [(-0.3, -0.6), (0.2, -0.4), (-2.0, -0.5),
                                               (0.0, -1.0), (1.0, 2.0)])
def test_reduction_ratio_is_actual_over_predicted(actual, predicted):
  got = quadratic.reduction_ratio(jnp.asarray(actual), jnp.asarray(predicted))
  np.testing.assert_allclose(got, actual / predicted, rtol=1e-6)


def test_reduction_ratio_is_zero_when_model_predicts_no_change():
  got = quadratic.reduction_ratio(jnp.asarray([0.5, 0.0, -1.0]), jnp.zeros(3))
  np.testing.assert_array_equal(got, [0.0, 0.0, 0.0])
  assert np.all(np.isfinite(jax.grad(
      lambda a: quadratic.reduction_ratio(a, jnp.asarray(0.0)))(jnp.asarray(1.0))))


def _reference_lm(damping, ratio, factor, lower, upper, lo, hi):
  if ratio > upper:
    damping = damping * factor
  elif ratio < lower:
    damping = damping / factor
  return min(max(damping, lo), hi)


@pytest.mark.parametrize("lower, upper", [(0.25, 0.75), (0.5, 1.5), (0.5, 0.5)])
def test_levenberg_marquardt_rule_against_reference(lower, upper):
  ratios = [-3.0, 0.0, 0.2, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0, 1.5, 1.6, 10.0, np.nan]
  for damping in [1e-3, 1.0, 50.0]:
    for ratio in ratios:
      got = quadratic.levenberg_marquardt(
          jnp.asarray(damping), jnp.asarray(ratio), factor=0.9, lower=lower, upper=upper,
          min_damping=1e-2, max_damping=10.0)
      expected = _reference_lm(damping, ratio, 0.9, lower, upper, 1e-2, 10.0)
      np.testing.assert_allclose(got, expected, rtol=1e-6,
                                 err_msg=f"damping={damping}, ratio={ratio}")


def test_levenberg_marquardt_default_bounds_are_open():
  got = quadratic.levenberg_marquardt(jnp.asarray([1e-30, 1e30]),
                                      jnp.asarray([2.0, -1.0]), factor=0.5)
  np.testing.assert_allclose(got, [0.5e-30, 2e30], rtol=1e-6)


@pytest.mark.parametrize("kind", ["full_rank", "rank_one", "zero", "diagonal"])
def test_closed_form_small_pinv_equals_lapack_pinv(kind):
  rng = np.random.default_rng(7)
  rtol = 100 * float(np.finfo(np.float32).eps)
  for _ in range(50):
    m = rng.normal(size=(2, 2))
    m = {"full_rank": m + m.T, "rank_one": np.outer(m[0], m[0]),
         "zero": np.zeros((2, 2)), "diagonal": np.diag(rng.normal(size=2))}[kind]
    m = jnp.asarray(m, jnp.float32)
    np.testing.assert_allclose(quadratic._small_symmetric_pinv(m, rtol),
                               jnp.linalg.pinv(m, rtol=rtol, hermitian=True),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("seed", range(-1, 6))
def test_minimiser_bounded_is_the_constrained_optimum(seed):
  """KKT conditions of min f̂ over μ ∈ [0, 1] (α free), and no point of a fine grid of
  feasible μ (each with its best α) does better. Seeds 0–5 put the free μ outside
  (below and above); seed −1 inside, at (1, ½)."""
  rng = np.random.default_rng(seed + 1)
  a = 2.0 * rng.standard_normal((2, 2))
  m, b = a @ a.T + 0.1 * np.eye(2), 3.0 * rng.standard_normal(2)
  if seed < 0:
    m = np.array([[2.0, 0.5], [0.5, 1.0]])
    b = -m @ np.array([1.0, 0.5])
  with jax.enable_x64(True):
    model = quadratic.QuadraticModel(*(jnp.asarray(v, jnp.float64) for v in (m, m, b)))
    x = np.asarray(quadratic.minimiser_bounded(model, 1, 0.0, 1.0))
  gradient = m @ x + b
  assert 0.0 <= x[1] <= 1.0
  np.testing.assert_allclose(gradient[0], 0.0, atol=1e-10)
  if x[1] == 0.0:
    assert gradient[1] >= -1e-10
  elif x[1] == 1.0:
    assert gradient[1] <= 1e-10
  else:
    np.testing.assert_allclose(x, -np.linalg.solve(m, b), rtol=1e-10)
  value = lambda v: b @ v + 0.5 * v @ m @ v
  mus = np.linspace(0.0, 1.0, 2001)
  alphas = -(b[0] + m[0, 1] * mus) / m[0, 0]
  assert value(x) <= min(value(np.array([al, mu])) for al, mu in zip(alphas, mus)) + 1e-12


def test_minimiser_bounded_one_direction_is_clipped():
  model = quadratic.QuadraticModel(jnp.eye(1), jnp.eye(1), jnp.array([-5.0]))
  np.testing.assert_allclose(quadratic.minimiser_bounded(model, 0, 0.0, 2.0), [2.0])
  with pytest.raises(ValueError, match="index 1 out of range"):
    quadratic.minimiser_bounded(model, 1, 0.0, 1.0)  # jnp indexing would clamp silently
