"""The extra-argument helpers shared by the solvers: the gradient check."""

import jax.numpy as jnp
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
