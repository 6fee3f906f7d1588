"""CVP module: every product against dense jax.jacobian / jax.hessian matrices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import curvax
from curvax import cvp, losses
from tests.conftest import tolerance

BATCH = 3


class _TinyConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(2, (3, 3), padding="SAME")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _TinyBatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(nn.tanh(x))


def _mlp_problem(dtype):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w1": jax.random.normal(k1, (4, 5), dtype) / 2, "b1": jnp.full((5,), 0.1, dtype),
            "w2": jax.random.normal(k2, (5, 3), dtype) / 2}
  x = jax.random.normal(k3, (BATCH, 4), dtype)
  predict = lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  return predict, params


def _conv_problem(dtype):
  x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 4, 4, 1), dtype)
  model = _TinyConv()
  params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.PRNGKey(2), x))
  return (lambda p: model.apply(p, x)), params


def _targets(loss_name, dtype):
  key = jax.random.PRNGKey(3)
  return {
      "squared_error": jax.random.normal(key, (BATCH, 3), dtype),
      "softmax_cross_entropy": jax.random.randint(key, (BATCH,), 0, 3),
      "sigmoid_binary_cross_entropy": jax.random.uniform(key, (BATCH, 3), dtype),
  }[loss_name]


class Dense:
  """Dense references on flattened parameters, built without curvax's products."""

  def __init__(self, predict, params, loss, targets):
    flat, self.unravel = ravel_pytree(params)
    self.flat = flat
    # One jitted program: the eager op-by-op jax.hessian of a Flax model is slower than
    # compiling it.
    (self.outputs, self.jacobian, self.ggn, self.hessian, self.grad,
     self.fisher) = jax.jit(lambda w: self._matrices(predict, loss, targets, w))(flat)

  def _matrices(self, predict, loss, targets, flat):
    outputs = predict(self.unravel(flat))
    objective = lambda w: loss.value(predict(self.unravel(w)), targets)
    jacobian = jax.jacobian(lambda w: predict(self.unravel(w)).reshape(-1))(flat)
    output_hessian = jax.hessian(loss.value)(outputs, targets).reshape(outputs.size, -1)
    per_example = jax.jacobian(
        lambda w: loss.per_example_values(predict(self.unravel(w)), targets))(flat)
    return (outputs, jacobian, jacobian.T @ output_hessian @ jacobian,
            jax.hessian(objective)(flat), jax.grad(objective)(flat),
            per_example.T @ per_example / outputs.shape[0])

  def vector(self, key):
    return self.unravel(jax.random.normal(key, self.flat.shape, self.flat.dtype))


def _flat(tree):
  return ravel_pytree(tree)[0]


PROBLEMS = {"mlp": _mlp_problem, "conv": _conv_problem}
LOSSES = ["squared_error", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"]


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_every_product_equals_dense_matrix_vector_product(problem, loss_name, dtype):
  predict, params = PROBLEMS[problem](dtype)
  loss, targets = losses.get(loss_name), _targets(loss_name, dtype)
  dense = Dense(predict, params, loss, targets)
  v = dense.vector(jax.random.PRNGKey(4))
  u = jax.random.normal(jax.random.PRNGKey(5), dense.outputs.shape, dtype)
  tol = tolerance(dtype)

  @jax.jit
  def products(params, v, u):
    lin = cvp.linearize(predict, params, loss=loss, targets=targets)
    fused = lin.fused_ggn_vp(v)
    return dict(jvp=lin.jvp(v), vjp=lin.vjp(u), grad=lin.grad(), ggn=lin.ggn_vp(v),
                hessian=lin.hessian_vp(v), fisher=lin.fisher_vp(v), fused=fused.product,
                fused_jz=fused.jz, value=lin.loss_value)

  got = products(params, v, u)
  vf = _flat(v)
  np.testing.assert_allclose(got["jvp"].reshape(-1), dense.jacobian @ vf, **tol)
  np.testing.assert_allclose(_flat(got["vjp"]), dense.jacobian.T @ u.reshape(-1), **tol)
  np.testing.assert_allclose(_flat(got["grad"]), dense.grad, **tol)
  np.testing.assert_allclose(_flat(got["ggn"]), dense.ggn @ vf, **tol)
  np.testing.assert_allclose(_flat(got["hessian"]), dense.hessian @ vf, **tol)
  np.testing.assert_allclose(_flat(got["fisher"]), dense.fisher @ vf, **tol)
  np.testing.assert_allclose(_flat(got["fused"]), dense.ggn @ vf + dense.grad, **tol)
  np.testing.assert_allclose(got["fused_jz"], got["jvp"], **tol)
  np.testing.assert_allclose(got["value"], loss.value(dense.outputs, targets), **tol)
  for name in ("jvp", "ggn", "hessian", "fused"):
    assert jax.tree.leaves(got[name])[0].dtype == dtype


@pytest.mark.parametrize("loss_name", LOSSES)
def test_ggn_is_symmetric_psd_and_dense_helpers_match(loss_name, dtype):
  predict, params = _mlp_problem(dtype)
  loss, targets = losses.get(loss_name), _targets(loss_name, dtype)
  dense = Dense(predict, params, loss, targets)
  ggn = cvp.dense_curvature(predict, params, loss=loss, targets=targets)
  hessian = cvp.dense_curvature(predict, params, loss=loss, targets=targets,
                                curvature="hessian")
  tol = tolerance(dtype)
  np.testing.assert_allclose(ggn, ggn.T, **tol)
  assert jnp.linalg.eigvalsh(ggn.astype(jnp.float64) if dtype == jnp.float64
                             else ggn).min() > -1e-5
  np.testing.assert_allclose(ggn, dense.ggn, **tol)
  np.testing.assert_allclose(hessian, dense.hessian, **tol)


def test_ggn_equals_hessian_for_linear_network(dtype):
  """With a linear network and squared error the GGN is the exact Hessian."""
  x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 4), dtype)
  params = {"w1": jax.random.normal(jax.random.PRNGKey(1), (4, 3), dtype)}
  predict = lambda p: x @ p["w1"]
  targets = _targets("squared_error", dtype)
  ggn = cvp.dense_curvature(predict, params, loss="squared_error", targets=targets)
  hessian = cvp.dense_curvature(predict, params, loss="squared_error", targets=targets,
                                curvature="hessian")
  np.testing.assert_allclose(ggn, hessian, **tolerance(dtype))
  np.testing.assert_allclose(ggn, 2 * jnp.kron(x.T @ x, jnp.eye(3)) / BATCH,
                             **tolerance(dtype))


def test_linearization_crosses_jit_boundary():
  predict, params = _mlp_problem(jnp.float32)
  targets = _targets("softmax_cross_entropy", jnp.float32)
  lin = jax.jit(lambda p: cvp.linearize(predict, p, loss="softmax_cross_entropy",
                                        targets=targets))(params)
  v = jax.tree.map(jnp.ones_like, params)
  cached = jax.jit(lambda lin, v: lin.ggn_vp(v))(lin, v)
  direct = cvp.ggn_vp(predict, params, v, loss="softmax_cross_entropy", targets=targets)
  np.testing.assert_allclose(_flat(cached), _flat(direct), rtol=1e-5, atol=1e-6)


def test_has_aux_with_flax_batchnorm():
  """Curvature on the training-mode forward pass; updated batch_stats come back as aux."""
  model = _TinyBatchNormMLP()
  x = jax.random.normal(jax.random.PRNGKey(0), (BATCH + 2, 4))
  variables = model.init(jax.random.PRNGKey(1), x)
  targets = jax.random.normal(jax.random.PRNGKey(2), (BATCH + 2, 3))

  def predict(p):
    out, updates = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                               mutable=["batch_stats"])
    return out, updates["batch_stats"]

  lin = cvp.linearize(predict, variables["params"], loss="squared_error",
                      targets=targets, has_aux=True)
  expected_stats = predict(variables["params"])[1]
  np.testing.assert_allclose(_flat(lin.aux), _flat(expected_stats), rtol=1e-6)
  dense = Dense(lambda p: predict(p)[0], variables["params"], losses.squared_error(),
                targets)
  v = dense.vector(jax.random.PRNGKey(3))
  np.testing.assert_allclose(_flat(lin.ggn_vp(v)), dense.ggn @ _flat(v), rtol=2e-4,
                             atol=2e-5)
  np.testing.assert_allclose(_flat(lin.hessian_vp(v)), dense.hessian @ _flat(v),
                             rtol=2e-4, atol=2e-5)


def test_flax_nnx_model_through_split_merge():
  model = nnx.Sequential(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), nnx.tanh,
                         nnx.Linear(5, 3, rngs=nnx.Rngs(1)))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 4))
  targets = _targets("softmax_cross_entropy", jnp.float32)
  predict = lambda p: nnx.merge(graphdef, p)(x)
  dense = Dense(predict, params, losses.softmax_cross_entropy(), targets)
  v = dense.vector(jax.random.PRNGKey(1))
  got = cvp.ggn_vp(predict, params, v, loss="softmax_cross_entropy", targets=targets)
  np.testing.assert_allclose(_flat(got), dense.ggn @ _flat(v), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_sharpness_equals_top_dense_eigenvalue(curvature):
  with jax.enable_x64(True):
    predict, params = _mlp_problem(jnp.float64)
    targets = _targets("squared_error", jnp.float64)
    matrix = cvp.dense_curvature(predict, params, loss="squared_error", targets=targets,
                                 curvature=curvature)
    eigenvalues = jnp.linalg.eigvalsh(matrix)
    expected = eigenvalues[jnp.argmax(jnp.abs(eigenvalues))]
    got = jax.jit(lambda p: curvax.sharpness(
        predict, p, loss="squared_error", targets=targets, key=jax.random.PRNGKey(0),
        curvature=curvature, num_iters=300))(params)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_top_eigenvalue_of_known_diagonal_operator():
  scales = {"a": jnp.array([1.0, 5.0]), "b": jnp.array([[2.0, -7.5, 3.0]])}
  matvec = lambda v: jax.tree.map(jnp.multiply, scales, v)
  value, vector = cvp.top_eigenvalue(matvec, scales, jax.random.PRNGKey(0), num_iters=200)
  np.testing.assert_allclose(value, -7.5, rtol=1e-5)
  np.testing.assert_allclose(jnp.abs(vector["b"][0, 1]), 1.0, rtol=1e-4)


def test_bad_arguments_raise_clear_errors():
  predict, params = _mlp_problem(jnp.float32)
  lin = cvp.linearize(predict, params, loss="squared_error",
                      targets=_targets("squared_error", jnp.float32))
  with pytest.raises(ValueError, match="unknown curvature 'exact'"):
    lin.product("exact")
  with pytest.raises(ValueError, match="num_iters must be >= 1"):
    cvp.top_eigenvalue(lin.ggn_vp, params, jax.random.PRNGKey(0), num_iters=0)
  with pytest.raises(ValueError, match="targets shape"):
    cvp.linearize(predict, params, loss="squared_error", targets=jnp.zeros((BATCH, 2)))
