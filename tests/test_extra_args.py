"""The extra-argument helpers shared by the solvers: the gradient check, and a
line-search chain that compiles once."""

import jax
import jax.numpy as jnp
import optax
import pytest

import curvax
from tests import dense_reference as ref

LOSS = "softmax_cross_entropy"
SOLVERS = ["curveball", "hessian_free", "sqn", "lsr1"]


def _update(name, gradient):
  problem = ref.tiny_mlp(jnp.float32)
  tx = getattr(curvax, name)(LOSS)
  return tx.update(gradient, tx.init(problem.params), problem.params,
                   predict_fn=problem.predict_fn(), targets=problem.y)


@pytest.mark.parametrize("name", SOLVERS)
def test_gradient_with_another_structure_is_a_clear_error(name):
  params = ref.tiny_mlp(jnp.float32).params
  # Same leaves and sizes, other keys: a flattening solver would pair them silently.
  renamed = {k.upper(): v for k, v in params.items()}
  with pytest.raises(ValueError, match=rf"{name}: the gradient \(updates\) does not have "
                     r"the structure of params.*'W1'.*'w1'.*or None"):
    _update(name, renamed)


@pytest.mark.parametrize("name", SOLVERS)
def test_gradient_with_other_shapes_is_a_clear_error(name):
  params = ref.tiny_mlp(jnp.float32).params
  transposed = dict(params, w1=params["w1"].T)
  with pytest.raises(ValueError, match=rf"{name}: .*shape \(4, 3\) at \['w1'\] where "
                     r"params has shape \(3, 4\)"):
    _update(name, transposed)


def test_empty_or_none_gradient_means_compute_it():
  params = ref.tiny_mlp(jnp.float32).params
  given = curvax.extra_args.given_gradient
  assert given("hessian_free", None, params) is None
  assert given("hessian_free", {}, params) is None
  assert given("hessian_free", params, params) is params


def test_line_search_chain_compiles_once_from_a_strongly_typed_state():
  problem = ref.tiny_mlp(jnp.float32)
  loss = curvax.losses.get(LOSS)
  tx = optax.chain(curvax.lsr1(loss),
                   optax.scale_by_backtracking_linesearch(max_backtracking_steps=15))
  value_fn, predict, traces = curvax.objective(loss), problem.predict_fn(), []

  @jax.jit
  def step(params, state):
    traces.append(1)
    value, grad = jax.value_and_grad(value_fn)(params, predict_fn=predict,
                                               targets=problem.y)
    updates, state = tx.update(grad, state, params, value=value, grad=grad,
                               value_fn=value_fn, predict_fn=predict, targets=problem.y)
    return optax.apply_updates(params, updates), state

  params, state = problem.params, curvax.without_weak_types(tx.init(problem.params))
  for leaf, original in zip(jax.tree.leaves(state), jax.tree.leaves(tx.init(params))):
    assert leaf.dtype == original.dtype and not leaf.weak_type
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1
