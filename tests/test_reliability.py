"""One reliability suite for every solver: determinism, retracing, non-finite batches,
bfloat16 parameters (checkpoints: ``tests/test_checkpoints.py``, on the same runs).

Each solver trains a tiny tanh MLP on fixed synthetic batches; the references are the
same solver's own uninterrupted run (bit-for-bit on CPU) or first principles.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax

LOSS = "softmax_cross_entropy"
STEPS = 6

SOLVERS = {
    "curveball": lambda: curvax.curveball(LOSS, damping=1.0),
    "curveball/fixed": lambda: curvax.curveball(LOSS, rho=0.9, beta=0.1),
    "hessian_free": lambda: curvax.hessian_free(LOSS, max_cg_iters=5, min_cg_iters=2),
    "sqn": lambda: curvax.sqn(LOSS, learning_rate=0.5, memory=3, pair_period=2),
    "lsr1": lambda: curvax.lsr1(LOSS, learning_rate=0.1, memory=3),
    "kfac": lambda: curvax.kfac(LOSS, inverse_period=2),
    "kflr": lambda: curvax.kflr(LOSS),
    "kfra": lambda: curvax.kfra(LOSS, activations=jnp.tanh),
    "ekfac": lambda: curvax.ekfac(LOSS, inverse_period=2),
}


def init_params(dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w1": (jax.random.normal(k1, (5, 8)) / 2).astype(dtype),
          "b1": jnp.zeros((8,), dtype),
          "w2": (jax.random.normal(k2, (8, 3)) / 3).astype(dtype)}


def batch(i, dtype=jnp.float32):
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), i))
  return jax.random.normal(kx, (12, 5), dtype), jax.random.randint(ky, (12,), 0, 3)


def predict(params, x):
  # Tagged layers (plain matmuls outside a Kronecker capture) so the KFAC family sees them.
  hidden = jnp.tanh(curvax.kron.dense(x, params["w1"], params["b1"]))
  return curvax.kron.dense(hidden, params["w2"])


@functools.lru_cache(maxsize=None)
def solver(name):
  """``(tx, jitted step)`` per solver, shared by the tests so each compiles once."""
  tx = SOLVERS[name]()
  return tx, make_step(tx)


def make_step(tx):
  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(None, state, params, predict_fn=lambda p: predict(p, x),
                               targets=y)
    return optax.apply_updates(params, updates), state
  return step


def train(step, params, state, first, last):
  for i in range(first, last):
    params, state = step(params, state, *batch(i))
  return params, state


def assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


solver_names = pytest.mark.parametrize("name", list(SOLVERS))


@solver_names
def test_two_independently_built_runs_are_identical(name):
  tx, step = solver(name)
  other = SOLVERS[name]()
  params = init_params()
  assert_trees_equal(train(step, params, tx.init(params), 0, STEPS),
                     train(make_step(other), params, other.init(params), 0, STEPS))


@solver_names
def test_a_step_that_donates_params_and_state_matches_one_that_does_not(name):
  """``donate_argnums`` on the state (as kfac-jax's and many training loops' steps do)
  needs every state leaf in its own buffer: a shared one is refused at the first call
  ("donate the same buffer twice")."""
  tx, step = solver(name)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def donating(params, state, x, y):
    return step(params, state, x, y)

  params = init_params()
  expected = train(step, params, tx.init(params), 0, 3)
  fresh = jax.tree.map(jnp.copy, params)
  assert_trees_equal(train(donating, fresh, tx.init(fresh), 0, 3), expected)


@solver_names
def test_no_retrace_after_the_first_step(name):
  tx = SOLVERS[name]()
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    updates, state = tx.update(None, state, params, predict_fn=lambda p: predict(p, x),
                               targets=y)
    return optax.apply_updates(params, updates), state

  params = init_params()
  train(step, params, tx.init(params), 0, STEPS)
  assert len(traces) == 1


@solver_names
def test_a_non_finite_batch_is_skipped_and_training_continues(name):
  tx, step = solver(name)
  params, state = train(step, init_params(), tx.init(init_params()), 0, 2)
  x, y = batch(2)
  bad_x = x.at[3, 1].set(jnp.nan)
  new_params, new_state = step(params, state, bad_x, y)
  assert_trees_equal(new_params, params)
  unchanged = {"num_skipped": state.num_skipped}
  if name in ("kfac", "kflr", "kfra"):
    # A refresh step (count 2) may leave the inverses it computed: the count does not
    # advance, so the retried step computes them again before using them (below).
    unchanged["inverse"] = state.inverse
  assert_trees_equal(new_state._replace(**unchanged), state)
  assert int(new_state.num_skipped) == int(state.num_skipped) + 1
  # The next finite batch proceeds exactly as if the bad one had never come.
  after = step(new_params, new_state, x, y)
  expected = step(params, state, x, y)
  assert_trees_equal(after[0], expected[0])
  assert_trees_equal(after[1]._replace(num_skipped=expected[1].num_skipped), expected[1])


LOW_PRECISION = ([(name, jnp.bfloat16) for name in SOLVERS]
                 + [(name, jnp.float16) for name in ("kfac", "kflr", "kfra")])


@pytest.mark.parametrize("name,dtype", LOW_PRECISION,
                         ids=[f"{n}-{jnp.dtype(d).name}" for n, d in LOW_PRECISION])
def test_low_precision_parameters_train_without_nan(name, dtype):
  tx = SOLVERS[name]()

  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(None, state, params, predict_fn=lambda p: predict(p, x),
                               targets=y)
    return optax.apply_updates(params, updates), state, updates

  params = init_params(dtype)
  state = tx.init(params)
  # One batch throughout: the loss on it must fall (fresh random-label batches would
  # make the loss on any one of them non-monotone in float32 as well).
  x0, y0 = batch(0)
  x0 = x0.astype(dtype)
  first = curvax.losses.get(LOSS).value(predict(params, x0), y0)
  for _ in range(STEPS):
    params, state, updates = step(params, state, x0, y0)
    # Updates in the parameters' dtypes, as optax's own transforms return them.
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))
  assert int(state.num_skipped) == 0
  last = curvax.losses.get(LOSS).value(predict(params, x0), y0)
  assert float(last) < float(first)


BAD_CONFIGS = [
    (curvax.curveball, dict(damping=-1.0), "damping"),
    (curvax.curveball, dict(damping_period=-1), "damping_period"),
    (curvax.hessian_free, dict(damping=-1.0), "damping"),
    (curvax.hessian_free, dict(max_cg_iters=0), "max_cg_iters"),
    (curvax.sqn, dict(pair_period=0), "pair_period"),
    (curvax.sqn, dict(memory=0), "memory"),
    (curvax.lsr1, dict(learning_rate=0.0), "learning_rate"),
    (curvax.kfac, dict(learning_rate=jnp.asarray(-1.0)), "learning_rate"),
    (curvax.kflr, dict(factor_decay=np.float32(1.0)), "factor_decay"),
    (curvax.kflr, dict(gamma=1e-9, min_damping=1e-8), "gamma"),
]


@pytest.mark.parametrize("factory,kwargs,argument", BAD_CONFIGS,
                         ids=[f"{f.__name__}-{a}" for f, _, a in BAD_CONFIGS])
def test_bad_configuration_names_the_argument(factory, kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    factory(LOSS, **kwargs)


@pytest.mark.parametrize("factory", [curvax.curveball, curvax.hessian_free, curvax.sqn,
                                     curvax.lsr1])
def test_unknown_loss_name_is_a_value_error(factory):
  with pytest.raises(ValueError, match="softmax_cross_entropie"):
    factory("softmax_cross_entropie")


@solver_names
def test_missing_extra_arguments_name_them(name):
  tx = SOLVERS[name]()
  params = init_params()
  with pytest.raises(ValueError, match="predict_fn"):
    tx.update(None, tx.init(params), params, targets=batch(0)[1])
