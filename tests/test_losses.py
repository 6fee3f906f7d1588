"""Losses: closed-form output curvature against autodiff and independent formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
from curvax import losses
from curvax.problems import training
from tests import dense_reference as ref
from tests.conftest import tolerance

BATCH, DIM = 4, 3


def _log_cosh(o, t):
  return jnp.sum(jnp.log(jnp.cosh(o - t)))


def _cases(dtype):
  """(loss, outputs, targets, reference value) for every loss and target format."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  o = jax.random.normal(k1, (BATCH, DIM), dtype)
  labels = jax.random.randint(k2, (BATCH,), 0, DIM)
  soft = jax.nn.softmax(jax.random.normal(k3, (BATCH, DIM), dtype))
  real = jax.random.normal(k3, (BATCH, DIM), dtype)
  probs = jax.random.uniform(k3, (BATCH, DIM), dtype)
  return {
      "squared_error": (losses.squared_error(), o, real,
                        jnp.mean(jnp.sum((o - real) ** 2, axis=1))),
      "softmax_labels": (losses.softmax_cross_entropy(), o, labels, jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(o, labels))),
      "softmax_soft": (losses.softmax_cross_entropy(), o, soft,
                       jnp.mean(optax.softmax_cross_entropy(o, soft))),
      "sigmoid_bce": (losses.sigmoid_binary_cross_entropy(), o, probs,
                      jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(o, probs), 1))),
      "from_fn": (losses.from_fn(_log_cosh, name="log_cosh"), o, real,
                  jnp.mean(jnp.sum(jnp.log(jnp.cosh(o - real)), axis=1))),
  }


CASES = ["squared_error", "softmax_labels", "softmax_soft", "sigmoid_bce", "from_fn"]


def _dense_output_hessian(loss, o, t):
  # Jitted: one compilation is faster than dispatching autodiff's many ops one by one.
  return jax.jit(jax.hessian(loss.value))(o, t).reshape(o.size, o.size)


@pytest.mark.parametrize("case", CASES)
def test_value_and_grad_match_reference(case, dtype):
  loss, o, t, reference = _cases(dtype)[case]
  value, grad = jax.jit(loss.value_and_grad)(o, t)
  np.testing.assert_allclose(value, reference, **tolerance(dtype))
  np.testing.assert_allclose(loss.grad(o, t), grad, **tolerance(dtype))
  np.testing.assert_allclose(grad, jax.jit(jax.grad(loss.value))(o, t),
                             **tolerance(dtype))


@pytest.mark.parametrize("case", CASES)
def test_hessian_vp_matches_autodiff_hessian(case, dtype):
  loss, o, t, _ = _cases(dtype)[case]
  u = jax.random.normal(jax.random.PRNGKey(7), o.shape, dtype)
  expected = (_dense_output_hessian(loss, o, t) @ u.reshape(-1)).reshape(o.shape)
  np.testing.assert_allclose(jax.jit(loss.hessian_vp)(o, t, u), expected,
                             **tolerance(dtype))


@pytest.mark.parametrize("case", CASES)
def test_hessian_sqrt_blocks_reproduce_hessian(case, dtype):
  loss, o, t, _ = _cases(dtype)[case]
  c = jax.jit(loss.hessian_sqrt)(o, t)
  assert c.shape[1:] == o.shape
  hessian = _dense_output_hessian(loss, o, t).reshape(BATCH, DIM, BATCH, DIM)
  for n in range(BATCH):
    block = jnp.einsum("ki,kj->ij", c[:, n], c[:, n])
    np.testing.assert_allclose(block, hessian[n, :, n, :], **tolerance(dtype))
    for m in range(BATCH):
      if m != n:  # the batch-mean loss couples no two examples
        np.testing.assert_allclose(hessian[n, :, m, :], 0.0, atol=1e-12)


def test_softmax_over_positions_matches_autodiff(dtype):
  """Sequence outputs (B, T, C): labels per position, per-example loss summed over T."""
  loss = losses.softmax_cross_entropy()
  o = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4), dtype)
  t = jax.random.randint(jax.random.PRNGKey(2), (2, 3), 0, 4)
  u = jax.random.normal(jax.random.PRNGKey(3), o.shape, dtype)
  hessian = _dense_output_hessian(loss, o, t)
  np.testing.assert_allclose(jax.jit(loss.hessian_vp)(o, t, u).reshape(-1),
                             hessian @ u.reshape(-1), **tolerance(dtype))
  c = jax.jit(loss.hessian_sqrt)(o, t).reshape(-1, 2, 12)
  blocks = hessian.reshape(2, 12, 2, 12)
  for n in range(2):
    np.testing.assert_allclose(c[:, n].T @ c[:, n], blocks[n, :, n], **tolerance(dtype))


@pytest.mark.parametrize("case", ["squared_error", "softmax_labels", "softmax_soft",
                                  "sigmoid_bce"])
def test_sampled_target_gradients_have_covariance_hessian(case):
  """E_t~p(t|o)[∇ℓ ∇ℓᵀ] = H_ℓ per example (Fisher = GGN for these losses)."""
  loss, o, t, _ = _cases(jnp.float32)[case]
  o, t = o[:1], t[:1]
  num_samples = 20000
  keys = jax.random.split(jax.random.PRNGKey(11), num_samples)
  sampled = jax.jit(jax.vmap(lambda k: loss.sample(k, o, t)))(keys)
  assert sampled.dtype == t.dtype and sampled.shape[1:] == t.shape
  grads = jax.jit(jax.vmap(lambda s: loss.grad(o, s)))(sampled).reshape(num_samples, -1)
  outer = grads[:, :, None] * grads[:, None, :]
  covariance = jnp.mean(outer, axis=0)
  # Each entry is a mean of num_samples draws: 5 standard errors, from the draws.
  standard_error = jnp.std(outer, axis=0) / np.sqrt(num_samples)
  hessian = _dense_output_hessian(loss, o, t)  # batch of one: no 1/B factor
  np.testing.assert_array_less(jnp.abs(covariance - hessian), 5 * standard_error + 1e-6)


def test_sample_requires_a_predictive_distribution():
  loss = losses.from_fn(_log_cosh)
  with pytest.raises(NotImplementedError, match="no predictive distribution"):
    loss.sample(jax.random.PRNGKey(0), jnp.zeros((2, 3)), jnp.zeros((2, 3)))


@pytest.mark.parametrize("make_loss, outputs, targets, error, message", [
    (losses.squared_error, jnp.zeros((4, 3)), jnp.zeros((4, 2)), ValueError,
     "targets shape"),
    (losses.squared_error, jnp.zeros((4, 3)), jnp.zeros((4, 3), jnp.int32), TypeError,
     "must be floating point"),
    (losses.sigmoid_binary_cross_entropy, jnp.zeros((4, 3)), jnp.ones((4, 3), jnp.int32),
     TypeError, "must be floating point"),
    (losses.softmax_cross_entropy, jnp.zeros((4, 3)), jnp.zeros((4, 1), jnp.int32),
     ValueError, "integer labels must have shape"),
    (losses.softmax_cross_entropy, jnp.zeros((4, 3)), jnp.zeros((4, 2)), ValueError,
     "one-hot / soft targets"),
    (losses.softmax_cross_entropy, jnp.zeros((4, 3)), jnp.zeros(4), TypeError,
     "targets .* cast to int or pass one-hot"),
    (losses.softmax_cross_entropy, jnp.zeros((4, 2, 3)), jnp.zeros((4, 2)), TypeError,
     "targets .* cast to int or pass one-hot"),
    (losses.softmax_cross_entropy, jnp.zeros((4, 3), jnp.int32), jnp.zeros(4, jnp.int32),
     TypeError, "outputs must be floating point"),
    (lambda: losses.from_fn(lambda o, t: o - t), jnp.zeros((4, 3)), jnp.zeros((4, 3)),
     ValueError, "must return a scalar per example"),
    (lambda: losses.from_fn(_log_cosh), jnp.zeros((4, 3)), jnp.zeros((5, 3)),
     ValueError, "batch size"),
])
def test_bad_input_raises_at_trace_time(make_loss, outputs, targets, error, message):
  loss = make_loss()
  with pytest.raises(error, match=message):
    jax.jit(loss.value).lower(outputs, targets)


@pytest.mark.parametrize("label", [15, -1])
def test_label_outside_the_classes_makes_the_loss_nan(label):
  """Labels in range give optax's value; one label that is no class makes the batch NaN
  (optax's loss is NaN for 15 and wraps −1 round to the last class)."""
  loss = losses.softmax_cross_entropy()
  o = jax.random.normal(jax.random.PRNGKey(0), (4, 10))
  good = jnp.array([0, 3, 9, 5])
  np.testing.assert_allclose(
      loss.value(o, good),
      jnp.mean(optax.softmax_cross_entropy_with_integer_labels(o, good)), rtol=1e-6)
  bad = good.at[2].set(label)
  assert np.isnan(loss.value(o, bad))
  assert np.isnan(loss.per_example_values(o, bad)[2])
  assert np.all(np.isfinite(loss.grad(o, bad)))  # as optax's: the value flags the batch


def test_solver_skips_and_counts_a_batch_with_a_label_outside_the_classes():
  problem = ref.tiny_mlp(jnp.float32)  # 3 classes
  tx = curvax.sqn(losses.softmax_cross_entropy(), learning_rate=0.1, memory=3,
                  pair_period=1)
  step = ref.tiny_mlp_stepper(tx)
  state = tx.init(problem.params)
  updates, state = step(problem.params, state, problem.x, problem.y)
  params = optax.apply_updates(problem.params, updates)
  updates, new_state = step(params, state, problem.x, problem.y.at[0].set(3))
  ref.assert_batch_skipped(optax.apply_updates(params, updates), updates, new_state,
                           params, state)


@pytest.mark.parametrize("case", ["squared_error", "softmax_labels", "softmax_soft",
                                  "sigmoid_bce", "from_fn"])
def test_benchmark_baseline_objective_is_the_loss_value(case):
  """The optax-loss objective the benchmarks' baseline steps optimise is curvax's."""
  loss, o, t, reference = _cases(jnp.float32)[case]
  objective = training.optax_objective(loss)
  np.testing.assert_allclose(objective(o, t), reference, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(objective)(o, t), loss.grad(o, t), rtol=1e-5,
                             atol=1e-7)


def test_get_by_name_and_unknown_name():
  assert losses.get("squared_error").name == "squared_error"
  with pytest.raises(ValueError, match="unknown loss 'hinge'"):
    losses.get("hinge")
