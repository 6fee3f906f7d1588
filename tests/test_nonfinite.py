"""Non-finite landings undone (``curvax.nonfinite``): every solver that rolls back.

A small ReLU MLP with squared error, where scaling the weights by 1e5 takes the float32
loss past overflow. Two ways in: a learning-rate spike on one step (an optax schedule
given as the solver's ``learning_rate``) for the solvers that apply it unseen, and a
hand-set landing (parameters moved by ``u``, the solver's record of its last update set
to ``u``) for every solver — Hessian-free and the trust-region SQN and L-SR1 refuse the
spike's trial point themselves, so nothing lands.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvax

LOSS = "squared_error"
WIDTHS = (4, 16, 16, 16, 2)
SPIKE_AT, SPIKE = 4, 1e5


def init_params():
  keys = jax.random.split(jax.random.PRNGKey(0), len(WIDTHS))
  return {f"w{i}": jax.random.normal(keys[i], (a, b), jnp.float32) / np.sqrt(a)
          for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:]))}


def predict(params, x):
  last = len(WIDTHS) - 2
  for i in range(last + 1):
    x = curvax.kron.dense(x, params[f"w{i}"])  # x @ w; a Kronecker layer for KFAC
    x = jax.nn.relu(x) if i < last else x
  return x


def batch(i):
  """Four batches in turn, so a cycle's mean loss is comparable across cycles."""
  x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), i % 4), (32, 4),
                        jnp.float32)
  return x, jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], 1)


def loss_value(params, i):
  x, y = batch(i)
  return float(curvax.losses.get(LOSS).value(predict(params, x), y))


def spiked(count):
  return jnp.where(count == SPIKE_AT, SPIKE, 1.0)


SOLVERS = {
    "curveball": lambda lr=1.0: curvax.curveball(LOSS, learning_rate=lr),
    "hessian_free": lambda lr=1.0: curvax.hessian_free(LOSS, learning_rate=lr,
                                                       max_cg_iters=10),
    "sqn": lambda lr=1.0: curvax.sqn(LOSS, learning_rate=lr),
    "sqn/no trust region": lambda lr=1.0: curvax.sqn(LOSS, learning_rate=lr,
                                                     trust_region=False),
    "lsr1": lambda lr=1.0: curvax.lsr1(LOSS, learning_rate=lr),
    "lsr1/no trust region": lambda lr=1.0: curvax.lsr1(LOSS, learning_rate=lr,
                                                       trust_region=False),
    "kfac": lambda lr=1.0: curvax.kfac(LOSS, learning_rate=lr),
    "kflr": lambda lr=1.0: curvax.kflr(LOSS, learning_rate=lr, momentum=False),
    "ekfac": lambda lr=1.0: curvax.ekfac(LOSS, learning_rate=lr),
    # Without the τ rule nothing checks the trial point, so the spike lands.
    "kfac/no tau rule": lambda lr=1.0: curvax.kfac(LOSS, learning_rate=lr, tau_period=0),
}


def make_step(tx):
  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(None, state, params, predict_fn=lambda p: predict(p, x),
                               targets=y)
    return optax.apply_updates(params, updates), state, updates
  return step


def damping_of(state):
  """The quantity a rollback raises (λ) or, for the quasi-Newton solvers, shrinks (Δ)."""
  if hasattr(state, "tau"):  # KFAC / KFLR: τ of the full-GGN model
    return float(state.tau)
  return float(state.trust_radius if hasattr(state, "trust_radius") else state.damping)


def with_last_update(state, update):
  """``state`` recording ``update`` as the last update the solver applied."""
  if hasattr(state, "last_step_scale"):  # CurveBall: α z
    return state._replace(z=update, last_step_scale=jnp.ones((), jnp.float32))
  if hasattr(state, "velocity"):  # KFAC / KFLR / EKFAC: the last step applied
    return state._replace(velocity=update)
  if hasattr(state, "trust_radius"):  # SQN / L-SR1: flattened, in float32
    return state._replace(last_update=ravel_pytree(update)[0])
  return state._replace(last_update=update)


@pytest.mark.parametrize("name", ["curveball", "sqn/no trust region", "lsr1/no trust region",
                                  "kfac/no tau rule"])
def test_a_learning_rate_spike_is_rolled_back_and_training_recovers(name):
  step = make_step(tx := SOLVERS[name](spiked))
  params, state = init_params(), tx.init(init_params())
  losses, before_spike = [], None
  for i in range(16):
    losses.append(loss_value(params, i))
    if i == SPIKE_AT:
      before_spike = params
    params, state, _ = step(params, state, *batch(i))
    if i == SPIKE_AT + 1:  # the batch after the spike undid it
      assert int(state.num_rolled_back) == 1
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before_spike)):
        np.testing.assert_allclose(a, b, atol=1e-2)
  landed = losses[SPIKE_AT + 1]
  assert not np.isfinite(landed) or landed > 1e20
  assert np.all(np.isfinite(losses[SPIKE_AT + 2:]))
  # Later cycles of the four batches below the first one.
  assert np.mean(losses[-4:]) < np.mean(losses[:4])
  assert int(state.num_rolled_back) == 1 and int(state.num_skipped) == 0


@pytest.mark.parametrize("name", ["hessian_free", "sqn", "lsr1"])
def test_solvers_that_check_their_trial_point_refuse_the_spike(name):
  step = make_step(tx := SOLVERS[name](spiked))
  params, state = init_params(), tx.init(init_params())
  for i in range(SPIKE_AT + 3):
    params, state, _ = step(params, state, *batch(i))
    assert np.isfinite(loss_value(params, i + 1))
  assert int(state.num_rolled_back) == 0 and int(state.num_skipped) == 0


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_landing_is_reversed_once_then_a_non_finite_batch_is_skipped(name):
  step = make_step(tx := SOLVERS[name]())
  params, state = init_params(), tx.init(init_params())
  for i in range(3):
    params, state, _ = step(params, state, *batch(i))
  start = loss_value(params, 3)
  # Land: every weight ×(1 + 1e5), so the ReLU network's outputs ×1e20 and the squared
  # error overflows; the solver believes it took that update.
  update = jax.tree.map(lambda p: 1e5 * p, params)
  landed = optax.apply_updates(params, update)
  assert not np.isfinite(loss_value(landed, 3))
  state = with_last_update(state, update)
  restored, rolled, returned = step(landed, state, *batch(3))
  for r, u in zip(jax.tree.leaves(returned), jax.tree.leaves(update)):
    np.testing.assert_array_equal(r, -u)
  assert int(rolled.num_rolled_back) == 1
  assert int(rolled.num_skipped) == int(state.num_skipped)
  if name.startswith(("sqn", "lsr1")):
    assert damping_of(rolled) <= 0.5 * float(jnp.linalg.norm(ravel_pytree(update)[0]))
  else:
    assert damping_of(rolled) > damping_of(state)
  np.testing.assert_allclose(loss_value(restored, 3), start, rtol=1e-2)
  # The same non-finite batch again, right after: nothing left to reverse, so skipped.
  again, skipped, zero = step(landed, rolled, *batch(3))
  assert all(np.all(np.asarray(z) == 0) for z in jax.tree.leaves(zero))
  assert int(skipped.num_rolled_back) == 1
  assert int(skipped.num_skipped) == int(state.num_skipped) + 1
  # Training goes on from the restored parameters.
  params, state = restored, skipped
  for i in range(4, 20):
    params, state, _ = step(params, state, *batch(i))
  final = [loss_value(params, i) for i in range(4)]
  assert np.all(np.isfinite(final)) and np.mean(final) < start


def test_rollback_due_needs_a_finite_loss_and_gradient_before_the_update():
  params = {"w": jnp.ones((3,), jnp.float32)}
  loss_at = lambda p: jnp.sum(p["w"] ** 2)
  move = {"w": jnp.full((3,), 2.0, jnp.float32)}
  due = lambda finite, update, f=loss_at: bool(
      curvax.nonfinite.rollback_due(jnp.asarray(finite), params, update, f))
  assert due(False, move)
  assert not due(True, move)
  assert not due(False, jax.tree.map(jnp.zeros_like, move))  # nothing to reverse
  assert not due(False, move, lambda p: loss_at(p) * jnp.nan)  # a non-finite batch
  assert due(False, lambda: move)  # the record may be rebuilt lazily
