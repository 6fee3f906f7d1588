"""Curvature on a sub-batch for the Kronecker family (``curvature_fraction``,
``curvature_predict_fn``): the factors, the α/μ model and ρ on the first ⌈f·B⌉
examples, the gradient on the whole batch — against dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvax
from curvax import kron, losses
from curvax.problems import models
from tests import dense_reference as ref

BATCH, TAU = 6, 1e-2


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def _problem():
  model = models.MLP(features=(4, 3))
  x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 3), jnp.float64)
  y = jax.random.randint(jax.random.PRNGKey(1), (BATCH,), 0, 3)
  params = jax.tree.map(lambda a: a.astype(jnp.float64),
                        model.init(jax.random.PRNGKey(2), x))
  return model, params, x, y


def _one_step(tx, params, predict, y, **extra):
  # One compiled program: op-by-op dispatch of a Kronecker step compiles every primitive
  # on its own and was most of these tests' time.
  @jax.jit
  def step(params):
    return tx.update(None, tx.init(params), params, predict_fn=predict, targets=y, **extra)
  return step(params)


def test_factors_are_the_estimate_on_the_first_rows():
  model, params, x, y = _problem()
  _, state = _one_step(curvax.kflr("softmax_cross_entropy", curvature_fraction=0.5),
                       params, lambda p: model.apply(p, x), y)
  sub = lambda p: model.apply(p, x[:3])
  _, given = _one_step(curvax.kflr("softmax_cross_entropy"), params,
                       lambda p: model.apply(p, x), y, curvature_predict_fn=sub,
                       curvature_targets=y[:3])
  cap = kron.capture(sub, params, loss="softmax_cross_entropy", targets=y[:3])
  direct = kron.kflr_factors(cap, None, fallback_diagonal=True)
  for block, q, g in zip(cap.blocks, direct.q, direct.g):
    for factors in (state.factors, given.factors):
      np.testing.assert_allclose(factors.q[block.kernel], q, rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(factors.g[block.kernel], g, rtol=1e-12, atol=1e-14)
  # The state's loss is the whole batch's, not the sub-batch's.
  whole = ref.loss_at(lambda p: model.apply(p, x), params, y)
  np.testing.assert_allclose(state.loss, whole, rtol=1e-6)
  assert abs(whole - ref.loss_at(sub, params, y[:3])) > 1e-3


def test_one_example_gives_the_dense_ggn_blocks():
  """f·B = 1: KFLR's factors are exactly the example's GGN diagonal blocks (eq. 19)."""
  model, params, x, y = _problem()
  _, state = _one_step(curvax.kflr("softmax_cross_entropy", curvature_fraction=1 / BATCH),
                       params, lambda p: model.apply(p, x), y)
  ggn, _ = ref.dense_ggn(lambda p: model.apply(p, x[:1]), params, y[:1])
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  offsets = np.cumsum([0] + [leaf.size for _, leaf in leaves])
  where = {jax.tree_util.keystr(path): (offsets[i], leaf.shape)
           for i, (path, leaf) in enumerate(leaves)}
  flat_leaves = jax.tree.leaves(params)
  for layer in ("Dense_0", "Dense_1"):
    k_off, (fan_in, fan_out) = where[f"['params']['{layer}']['kernel']"]
    b_off, _ = where[f"['params']['{layer}']['bias']"]
    rows = [k_off + r * fan_out + np.arange(fan_out) for r in range(fan_in)]
    index = np.concatenate(rows + [b_off + np.arange(fan_out)])
    kernel = next(i for i, leaf in enumerate(flat_leaves) if leaf.shape == (fan_in, fan_out))
    block = np.kron(state.factors.q[kernel], state.factors.g[kernel])
    np.testing.assert_allclose(block, ggn[np.ix_(index, index)], rtol=1e-9, atol=1e-12)


def test_step_is_the_model_minimiser_with_sub_batch_curvature_and_whole_gradient():
  """Along the step u: ∇f_Bᵀu + uᵀG_S u + τ‖u‖² = 0 (the 1-D model's optimum, eq. 40)."""
  model, params, x, y = _problem()
  tx = curvax.kfac("softmax_cross_entropy", curvature_fraction=0.5, momentum=False,
                   tau=TAU, tau_period=0)
  updates, _ = _one_step(tx, params, lambda p: model.apply(p, x), y)
  u = ref.flat(updates)
  ggn_sub, _ = ref.dense_ggn(lambda p: model.apply(p, x[:3]), params, y[:3])
  ggn_all, grad = ref.dense_ggn(lambda p: model.apply(p, x), params, y)
  scale = abs(grad @ u)
  np.testing.assert_allclose(grad @ u + u @ ggn_sub @ u + TAU * u @ u, 0, atol=1e-6 * scale)
  assert abs(grad @ u + u @ ggn_all @ u + TAU * u @ u) > 1e-4 * scale


def test_tau_rule_ratio_is_on_the_sub_batch():
  """ρ = (f_S(θ+u) − f_S(θ)) / (∇f_Sᵀu + ½uᵀ(G_S + τI)u) over the same examples."""
  model, params, x, y = _problem()
  tx = curvax.kfac("softmax_cross_entropy", curvature_fraction=0.5, momentum=False,
                   tau=TAU, tau_period=1)
  updates, state = _one_step(tx, params, lambda p: model.apply(p, x), y)
  sub = lambda p: model.apply(p, x[:3])
  u = ref.flat(updates)
  ggn, grad = ref.dense_ggn(sub, params, y[:3])
  new = optax.apply_updates(params, updates)
  actual = ref.loss_at(sub, new, y[:3]) - ref.loss_at(sub, params, y[:3])
  expected = actual / (grad @ u + 0.5 * (u @ ggn @ u + TAU * u @ u))
  np.testing.assert_allclose(state.reduction_ratio, expected, rtol=1e-5)


def test_pure_jax_model_needs_the_sub_batch_passed_in():
  mlp = ref.tiny_mlp(batch=4)
  predict = lambda p: kron.dense(jnp.tanh(kron.dense(mlp.x, p["w1"], p["b1"])), p["w2"],
                                 p["b2"])
  tx = curvax.kfac(losses.softmax_cross_entropy(), curvature_fraction=0.5)
  with pytest.raises(ValueError, match="curvature_predict_fn"):
    _one_step(tx, mlp.params, predict, mlp.y)
  sub = lambda p: kron.dense(jnp.tanh(kron.dense(mlp.x[:2], p["w1"], p["b1"])), p["w2"],
                             p["b2"])
  updates, state = _one_step(tx, mlp.params, predict, mlp.y, curvature_predict_fn=sub,
                             curvature_targets=mlp.y[:2])
  assert np.all(np.isfinite(ravel_pytree(updates)[0])) and int(state.num_skipped) == 0
  with pytest.raises(ValueError, match="both"):
    _one_step(tx, mlp.params, predict, mlp.y, curvature_predict_fn=sub)


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.2])
def test_bad_fraction_is_a_clear_error(fraction):
  with pytest.raises(ValueError, match="curvature_fraction"):
    curvax.kfac("softmax_cross_entropy", curvature_fraction=fraction)
