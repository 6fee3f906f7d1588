"""CurveBall's λ rule as the authors run it, rejected trial steps, schedules, memory.

The λ-rule reference below is written from the authors' published optimiser (the
2×2 system ``A x = b`` of eq. 19 with ``A`` damped, ``f̂ = −½ xᵀb``, evaluations on
steps ``0, T, 2T, …``, factor ``ω^T``) on dense ``jax.jacobian`` / ``jax.hessian``
matrices; it shares no code with curvax's products.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
from curvax import losses
from curvax.problems import models
from tests.test_curveball import (DenseObjective, _exp_problem, _f32, _flat, _mlp,
                                  _ref_softmax_cross_entropy, _ref_squared_error,
                                  dense_curveball, run)


def authors_curveball(objective, w0, num_steps, *, damping, period=5, omega=0.999):
  """The authors' CurveBall step with automatic ρ, β and λ (α = 1), on dense matrices."""
  w, z, lam = np.asarray(w0, np.float64), np.zeros(np.size(w0)), _f32(damping)
  records = []
  for k in range(num_steps):
    ggn, g = objective.ggn(w), objective.gradient(w)
    dz = ggn @ z + g + lam * z
    a = np.array([[lam * dz @ dz + dz @ ggn @ dz, lam * dz @ z + z @ ggn @ dz],
                  [lam * dz @ z + z @ ggn @ dz, lam * z @ z + z @ ggn @ z]])
    b = np.array([g @ dz, g @ z])
    x = np.linalg.pinv(a) @ b
    beta, rho = x[0], -x[1]
    z = rho * z - beta * dz
    new_w = w + z
    ratio = np.nan
    if k % period == 0:
      ratio = (objective.value(new_w) - objective.value(w)) / (-0.5 * x @ b)
      if ratio < 0.5:
        lam = _f32(lam / omega ** period)
      if ratio > 1.5:
        lam = _f32(lam * omega ** period)
    records.append(dict(w=new_w, damping=lam, ratio=ratio, rho=rho, beta=beta))
    w = new_w
  return records


@pytest.mark.parametrize("loss_name, damping, omega", [
    ("softmax_cross_entropy", 10.0, 0.999),  # the paper's λ₀ and ω
    ("squared_error", 1.0, 0.9),             # a faster ω
])
def test_lambda_rule_matches_the_authors(loss_name, damping, omega):
  """15 steps (evaluations at 0, 5, 10) equal the authors' rule, and λ falls where the
  undamped model kept it at λ₀ (γ inside [1/2, 3/2]). Growth of λ: test_curveball."""
  ref_loss = {"softmax_cross_entropy": _ref_softmax_cross_entropy,
              "squared_error": _ref_squared_error}[loss_name]
  with jax.enable_x64(True):
    predict, params, targets = _mlp(loss_name, seed=8)
    objective = DenseObjective(predict, params, ref_loss, targets)
    tx = curvax.curveball(loss_name, damping=damping, damping_factor=omega)
    history = run(tx, params, 15, lambda p: dict(predict_fn=predict, targets=targets))
    records = authors_curveball(objective, _flat(params), 15, damping=damping,
                                omega=omega)
    last_ratio = np.nan
    for k, ((p, s, _), ref) in enumerate(zip(history, records)):
      np.testing.assert_allclose(_flat(p), ref["w"], rtol=1e-7, atol=1e-9, err_msg=k)
      np.testing.assert_allclose(s.damping, ref["damping"], rtol=1e-7, err_msg=k)
      last_ratio = ref["ratio"] if k % 5 == 0 else last_ratio
      np.testing.assert_allclose(s.reduction_ratio, last_ratio, rtol=1e-5, err_msg=k)
    assert np.isfinite(float(history[0][1].reduction_ratio))  # step 0 is evaluated
    assert float(history[-1][1].damping) < _f32(damping)  # γ > 3/2: λ fell


def test_fixed_rho_beta_use_the_damped_model_at_the_step_taken():
  """Fixed ρ, β (no eq. 19 solve): γ over ``gᵀs + ½ sᵀ(Ĥ + λI)s`` at ``s = αz``."""
  with jax.enable_x64(True):
    predict, params, targets = _mlp("squared_error", seed=9)
    objective = DenseObjective(predict, params, _ref_squared_error, targets)
    config = dict(rho=0.5, beta=0.3, damping=0.5, learning_rate=0.8, damping_period=3,
                  damping_factor=0.8)
    tx = curvax.curveball("squared_error", **config)
    history = run(tx, params, 12, lambda p: dict(predict_fn=predict, targets=targets))
    records = dense_curveball(objective, _flat(params), 12, **config)
    for k, ((p, s, _), ref) in enumerate(zip(history, records)):
      np.testing.assert_allclose(_flat(p), ref["w"], rtol=1e-8, atol=1e-10, err_msg=k)
      assert float(s.damping) == ref["damping"], k
      np.testing.assert_allclose(s.reduction_ratio, ref["ratio"], rtol=1e-6, err_msg=k)
    assert len({r["damping"] for r in records}) > 2  # λ moved on several evaluations


def test_nonfinite_trial_loss_rejects_the_step_and_raises_damping():
  """A step onto an inf loss is not applied; λ grows as for γ < 1/2 on every batch
  until a step is accepted (the count does not advance, so each batch re-evaluates)."""
  loss, predict, targets, params = _exp_problem(-2.0)  # float32: e^{w+s} overflows
  # z = 0, ρ = 0: s = −β g = 0.86 β; with β = 200 the trial point is w + s ≈ 171.
  tx = curvax.curveball(loss, rho=0.0, beta=200.0, damping=1.0, damping_factor=0.9)
  history = run(tx, params, 2, lambda p: dict(predict_fn=predict, targets=targets))
  for k, (p, s, u) in enumerate(history):
    assert float(u["w"][0]) == 0.0
    np.testing.assert_array_equal(p["w"], params["w"])
    np.testing.assert_array_equal(s.z["w"], 0.0)
    assert int(s.count) == 0 and int(s.num_skipped) == 0
    assert not np.isfinite(float(s.reduction_ratio))
    np.testing.assert_allclose(s.damping, 1.0 / 0.9 ** (5 * (k + 1)), rtol=1e-6)
  # A β that keeps the trial loss finite is accepted and counted.
  tx = curvax.curveball(loss, rho=0.0, beta=1.0, damping=1.0)
  ((p, s, u),) = run(tx, params, 1, lambda p: dict(predict_fn=predict, targets=targets))
  assert float(u["w"][0]) != 0.0 and int(s.count) == 1


def _hand_stepped(make_tx, runs, params, num_steps, extra_args):
  """For each sequence ``values`` in ``runs``: each step k taken by
  ``make_tx(values[k])`` on the shared state (one compiled step for every run)."""
  @jax.jit
  def step(params, state, value):
    updates, state = make_tx(value).update(None, state, params, **extra_args)
    return optax.apply_updates(params, updates), state

  results = []
  for values in runs:
    p, state = params, make_tx(values[0]).init(params)
    for k in range(num_steps):
      p, state = step(p, state, jnp.asarray(values[k]))
    results.append((p, state))
  return results


@pytest.mark.parametrize("name", ["learning_rate", "rho", "beta"])
def test_schedule_equals_constants_stepped_by_hand(name):
  """``learning_rate``/``rho``/``beta`` as an optax schedule of the step count equal
  the same values passed as (JAX array) constants step by step."""
  with jax.enable_x64(True):
    _check_schedule(name)


def _check_schedule(name):
  predict, params, targets = _mlp("softmax_cross_entropy", seed=10)
  schedule = {"learning_rate": optax.linear_schedule(1.0, 0.4, 5),
              "rho": optax.linear_schedule(0.2, 0.8, 5),
              "beta": optax.exponential_decay(0.5, 1, 0.7)}[name]
  fixed = {"rho": dict(beta=0.4), "beta": dict(rho=0.6)}.get(name, {})
  extra = dict(predict_fn=predict, targets=targets)
  make_tx = lambda v: curvax.curveball("softmax_cross_entropy", damping=1.0,
                                       damping_period=2, **fixed, **{name: v})
  history = run(make_tx(schedule), params, 6, lambda p: extra)
  # The schedule's values by hand, and its first value throughout (the schedule must
  # matter): one compiled step with the value as an argument.
  (p_hand, s_hand), (constant, _) = _hand_stepped(
      make_tx, [[schedule(k) for k in range(6)], [schedule(0)] * 6], params, 6, extra)
  p_sched, s_sched = history[-1][:2]
  np.testing.assert_allclose(_flat(p_sched), _flat(p_hand), rtol=1e-6, atol=1e-9)
  for field, a, b in zip(s_sched._fields, s_sched, s_hand):
    np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-6, atol=1e-9, err_msg=field)
  assert not np.allclose(_flat(constant), _flat(p_sched), rtol=1e-4)


def test_inject_hyperparams():
  """``optax.inject_hyperparams(curvax.curveball)``: every numeric argument becomes an
  array in the state (the integer period too); steps equal the plain transform's."""
  predict, params, targets = _mlp("softmax_cross_entropy", seed=11)
  params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  extra = lambda p: dict(predict_fn=predict, targets=targets)
  config = dict(learning_rate=0.7, damping=2.0, damping_period=2, damping_factor=0.9)
  injected = optax.inject_hyperparams(curvax.curveball)(
      loss="softmax_cross_entropy", **config)
  plain = curvax.curveball("softmax_cross_entropy", **config)
  (p_inj, s_inj, _), (p_plain, s_plain, _) = (run(tx, params, 5, extra)[-1]
                                              for tx in (injected, plain))
  assert set(s_inj.hyperparams) >= {"learning_rate", "damping_period"}
  np.testing.assert_allclose(_flat(p_inj), _flat(p_plain), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s_inj.inner_state.damping, s_plain.damping, rtol=1e-6)
  # NumPy scalars are numbers too.
  curvax.curveball("squared_error", learning_rate=np.float32(0.5), damping=np.float64(1))


@pytest.mark.parametrize("kwargs", [dict(damping=True), dict(learning_rate="1"),
                                    dict(rho=jnp.ones(2), beta=0.1)])
def test_non_numbers_are_refused(kwargs):
  with pytest.raises(TypeError, match=next(iter(kwargs))):
    curvax.curveball("squared_error", **kwargs)


def _temp_bytes(step, *args):
  analysis = jax.jit(step).lower(*args).compile().memory_analysis()
  return analysis.temp_size_in_bytes


@pytest.mark.parametrize("fixed", [False, True])
def test_compiled_step_memory_is_close_to_sgd(fixed):
  """XLA's temporary memory for one jitted step (MLP 784-1000-500-250-10, batch 256)
  is at most 1.5× that of the optax SGD step on the same model (curveball.md's claim of
  a footprint like momentum SGD's). Deterministic: a compiled-program property."""
  model = models.MLP(features=(1000, 500, 250, 10))
  x = jnp.zeros((256, 784))
  y = jnp.zeros((256,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  predict = lambda p: model.apply(p, x)
  sgd = optax.sgd(0.1)

  def sgd_step(params, state):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        predict(p), y).mean())(params)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  tx = curvax.curveball("softmax_cross_entropy",
                        **(dict(rho=0.9, beta=0.01) if fixed else {}))

  def curveball_step(params, state):
    updates, state = tx.update(None, state, params, predict_fn=predict, targets=y)
    return optax.apply_updates(params, updates), state

  ratio = (_temp_bytes(curveball_step, params, jax.eval_shape(tx.init, params))
           / _temp_bytes(sgd_step, params, jax.eval_shape(sgd.init, params)))
  assert ratio <= 1.5, ratio
