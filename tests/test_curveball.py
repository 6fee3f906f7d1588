"""CurveBall against dense re-implementations (jax.jacobian / jax.hessian, numpy solves).

The references below never call curvax's products: the GGN is ``Jᵀ H_L J`` from
``jax.jacobian`` of the network and ``jax.hessian`` of an independently written loss,
the gradient is ``jax.grad`` of the objective, and every CurveBall rule (eq. 15–19,
§3.4) is re-derived in numpy on flattened parameters.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
from flax.training import train_state
from jax.flatten_util import ravel_pytree

import curvax
from curvax import losses

BATCH = 5

# ---------------------------------------------------------------- reference pieces


def _ref_squared_error(outputs, targets):
  """``mean_n ‖o_n − t_n‖²`` (not halved), written without curvax."""
  return jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def _ref_softmax_cross_entropy(outputs, labels):
  """``mean_n −log softmax(o_n)[y_n]``, written without curvax."""
  log_p = jax.nn.log_softmax(outputs, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))


LOSSES = {
    "squared_error": (losses.squared_error, _ref_squared_error),
    "softmax_cross_entropy": (losses.softmax_cross_entropy, _ref_softmax_cross_entropy),
}


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


class DenseObjective:
  """``f(w) = L(φ(w), t)`` on flattened parameters: value, gradient, dense GGN."""

  def __init__(self, predict, params, loss_fn, targets):
    flat, self.unravel = ravel_pytree(params)
    self.size = flat.size
    outputs_at = lambda w: predict(self.unravel(w))
    objective = lambda w: loss_fn(outputs_at(w), targets)

    def evaluate(w):
      outputs = outputs_at(w)
      jac = jax.jacobian(lambda v: outputs_at(v).reshape(-1))(w)
      output_hessian = jax.hessian(
          lambda o: loss_fn(o.reshape(outputs.shape), targets))(outputs.reshape(-1))
      return objective(w), jax.grad(objective)(w), jac.T @ output_hessian @ jac

    self._evaluate = jax.jit(evaluate)  # one compilation serves all three

  def _at(self, w, index):
    return np.asarray(self._evaluate(jnp.asarray(w))[index], np.float64)

  def value(self, w):
    return float(self._at(w, 0))

  def gradient(self, w):
    return self._at(w, 1)

  def ggn(self, w):
    return self._at(w, 2)


def _f32(x):
  """CurveBallState keeps its scalars in float32; the reference rounds λ the same way."""
  return float(np.float32(x))


def _coefficients(ggn, damping, grad, z, delta, rho, beta):
  """``(ρ, β)`` minimising ``f̂(s) = gᵀs + ½ sᵀ(C + λI)s`` over ``s = ρz − βΔz``.

  Derived by setting the partial derivatives of ``f̂`` to zero (eq. 19 when both are
  free); a free ``ρ`` is 0 when ``z = 0`` (it multiplies nothing).
  """
  damped = ggn + damping * np.eye(ggn.shape[0])
  dd, zd, zz = delta @ damped @ delta, z @ damped @ delta, z @ damped @ z
  gd, gz = grad @ delta, grad @ z
  z_is_zero = not np.any(z)
  if rho is None and beta is None:
    if z_is_zero:
      return 0.0, gd / dd
    neg_beta, new_rho = -np.linalg.solve(np.array([[dd, zd], [zd, zz]]),
                                         np.array([gd, gz]))
    return new_rho, -neg_beta
  if rho is not None and beta is None:   # ∂f̂/∂β = −gᵀΔ − ρ zᵀDΔ + β ΔᵀDΔ = 0
    return rho, (gd + rho * zd) / dd
  if rho is None:                        # ∂f̂/∂ρ = gᵀz + ρ zᵀDz − β zᵀDΔ = 0
    return (0.0 if z_is_zero else (beta * zd - gz) / zz), beta
  return rho, beta


def _lambda_rule(damping, ratio, factor, min_damping, max_damping):
  """§3.4: shrink λ when the model under-predicts the decrease (γ > 3/2), grow it when
  it over-predicts (γ < 1/2) or the trial loss is not finite, then clip."""
  if not np.isfinite(ratio):
    damping /= factor
  elif ratio > 1.5:
    damping *= factor
  elif ratio < 0.5:
    damping /= factor
  return _f32(min(max(damping, min_damping), max_damping))


def dense_curveball(objective, w0, num_steps, *, damping, rho=None, beta=None,
                    learning_rate=1.0, damping_period=5, damping_factor=0.999,
                    min_damping=1e-8, max_damping=1e8, gradient=None,
                    transform_step=None):
  """CurveBall (curveball.md eq. 14–19, §3.4) on dense matrices, one record per step.

  ``gradient(w)`` replaces ``∇f`` (a user-supplied gradient), ``transform_step(s)`` is
  what the transforms after CurveBall in a chain do to its step. In the records,
  ``ratio`` is the last γ the λ rule used and ``gamma`` the γ of every step, due or not:
  the measured change over the DAMPED model at the step taken, on steps ``0, T, 2T…``,
  with ``damping_factor`` per iteration (``damping_factor^T`` per evaluation).
  """
  w = np.asarray(w0, np.float64)
  z = np.zeros_like(w)
  lam = _f32(damping)
  ratio = np.nan
  records = []
  for k in range(num_steps):
    ggn = objective.ggn(w)
    grad = objective.gradient(w) if gradient is None else gradient(w)
    delta = (ggn + lam * np.eye(w.size)) @ z + grad          # eq. 17
    new_rho, new_beta = _coefficients(ggn, lam, grad, z, delta, rho, beta)
    z = new_rho * z - new_beta * delta                        # eq. 15
    step = learning_rate * z                                  # eq. 16
    predicted = grad @ step + 0.5 * step @ (ggn + lam * np.eye(w.size)) @ step
    gamma = (objective.value(w + step) - objective.value(w)) / predicted
    if damping_period and k % damping_period == 0:            # §3.4
      ratio = gamma
      lam = _lambda_rule(lam, ratio, damping_factor ** damping_period, min_damping,
                         max_damping)
    update = step if transform_step is None else transform_step(step)
    records.append(dict(loss=objective.value(w), rho=new_rho, beta=new_beta, z=z.copy(),
                        damping=lam, ratio=ratio, gamma=gamma, update=update))
    w = w + update
    records[-1]["w"] = w.copy()
  return records


def run(tx, params, num_steps, extra_args, *, gradient=None, strong_init=False):
  """Jitted ``tx.update`` steps; ``extra_args(params)`` gives the keyword arguments.

  ``strong_init`` drops weak types from the initial state: optax's backtracking line
  search starts with a weak-typed counter, which would cost a second compilation.
  """

  @jax.jit
  def step(params, state):
    grads = None if gradient is None else gradient(params)
    updates, state = tx.update(grads, state, params, **extra_args(params))
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  if strong_init:
    state = jax.tree.map(lambda a: jnp.asarray(a, a.dtype), state)
  history = []
  for _ in range(num_steps):
    params, state, updates = step(params, state)
    history.append((params, state, updates))
  return history


def _mlp(loss_name, seed=0):
  """Tiny tanh MLP 3-4-3 (31 parameters) on a fixed batch; build under float64."""
  rng = np.random.default_rng(seed)  # numpy draws: no per-shape PRNG compilations
  params = {"w1": jnp.asarray(rng.normal(size=(3, 4)) / 1.5), "b1": 0.1 * jnp.ones(4),
            "w2": jnp.asarray(rng.normal(size=(4, 3)) / 1.5), "b2": jnp.zeros((3,))}
  x = jnp.asarray(rng.normal(size=(BATCH, 3)))
  if loss_name == "softmax_cross_entropy":
    targets = jnp.asarray(rng.integers(0, 3, size=BATCH))
  else:
    targets = jnp.asarray(rng.normal(size=(BATCH, 3)))
  predict = lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return predict, params, targets


def _assert_matches(history, records, *, rtol=1e-8, atol=1e-10, check_ratio=True):
  """Every step's params, z, ρ, β, λ, loss (and γ) against the dense reference."""
  for k, ((params, state, _), ref) in enumerate(zip(history, records)):
    msg = f"step {k}"
    np.testing.assert_allclose(_flat(params), ref["w"], rtol=rtol, atol=atol, err_msg=msg)
    np.testing.assert_allclose(_flat(state.z), ref["z"], rtol=rtol, atol=atol, err_msg=msg)
    np.testing.assert_allclose(state.rho, ref["rho"], rtol=1e-5, atol=1e-7, err_msg=msg)
    np.testing.assert_allclose(state.beta, ref["beta"], rtol=1e-5, err_msg=msg)
    np.testing.assert_allclose(state.loss, ref["loss"], rtol=1e-6, err_msg=msg)
    assert float(state.damping) == ref["damping"], msg
    if check_ratio:
      np.testing.assert_allclose(state.reduction_ratio, ref["ratio"], rtol=1e-5,
                                 err_msg=msg)
    assert int(state.count) == k + 1 and int(state.num_skipped) == 0


# ------------------------------------------------------------------ quadratics


def _quadratic(kind, seed=0):
  """``f(w) = ½ wᵀAw − bᵀw + const`` as a network and a loss.

  Returns ``(A, b, loss, predict_fn, targets, params)``.
  """
  rng = np.random.default_rng(seed)
  if kind == "from_fn":
    # Identity network, loss ℓ(o, t) = ½ oᵀAo − tᵀo with t = b: GGN = A exactly.
    root = rng.normal(size=(5, 5))
    a = root @ root.T + 0.5 * np.eye(5)
    b = rng.normal(size=5)
    a_j = jnp.asarray(a)
    loss = losses.from_fn(lambda o, t: 0.5 * o @ a_j @ o - t @ o, name="quadratic")
    predict = lambda p: p["w"][None, :]
    targets = jnp.asarray(b)[None, :]
  else:
    # Linear model on a batch with squared error: f = mean_n (x_nᵀw − y_n)², so
    # A = 2XᵀX/B and b = 2Xᵀy/B (squared_error is ‖o − t‖², not halved).
    x = rng.normal(size=(8, 5))
    y = rng.normal(size=8)
    a = 2 * x.T @ x / 8
    b = 2 * x.T @ y / 8
    xj = jnp.asarray(x)
    loss = losses.squared_error()
    predict = lambda p: (xj @ p["w"])[:, None]
    targets = jnp.asarray(y)[:, None]
  params = {"w": jnp.asarray(rng.normal(size=5))}
  return a, b, loss, predict, targets, params


@pytest.mark.parametrize("kind, damping", [("from_fn", 1.0), ("squared_error", 0.1)])
def test_converges_to_quadratic_minimiser(kind, damping):
  """Automatic ρ/β on ``½wᵀAw − bᵀw`` reach ``A⁻¹b``; λ falls while the model holds."""
  with jax.enable_x64(True):
    a, b, loss, predict, targets, params = _quadratic(kind)
    tx = curvax.curveball(loss, damping=damping)
    history = run(tx, params, 100, lambda p: dict(predict_fn=predict, targets=targets))
    solution = np.linalg.solve(a, b)
    np.testing.assert_allclose(history[-1][0]["w"], solution, rtol=1e-6, atol=1e-8)
    errors = [np.linalg.norm(p["w"] - solution) for p, _, _ in history]
    assert errors[49] < 1e-2 * errors[0] and errors[99] < 1e-2 * errors[49]
    # On an exact quadratic Δf is the undamped model, so γ = f̂₀(s) / f̂_λ(s) ≥ 1 with
    # f̂_λ(s) = gᵀs + ½ sᵀ(A + λI)s: λ can only fall (read while the steps are large
    # enough for f(w + s) − f(w) to be accurate).
    lams = [_f32(damping)] + [float(s.damping) for _, s, _ in history]
    for k in range(0, 20, 5):
      w = np.asarray(params["w"] if k == 0 else history[k - 1][0]["w"])
      step = np.asarray(history[k][2]["w"])
      g = a @ w - b
      undamped = g @ step + 0.5 * step @ a @ step
      expected = undamped / (undamped + 0.5 * lams[k] * step @ step)
      np.testing.assert_allclose(history[k][1].reduction_ratio, expected, rtol=1e-5)
      assert expected >= 1
    assert all(later <= earlier for earlier, later in zip(lams[:20], lams[1:20]))


@pytest.mark.parametrize("kind", ["from_fn", "squared_error"])
def test_z_update_is_closed_form_recursion(kind):
  """Fixed ρ/β: ``z ← ρz − β((A + λI)z + g)``, ``w ← w + αz`` (eq. 15–18) in numpy."""
  with jax.enable_x64(True):
    a, b, loss, predict, targets, params = _quadratic(kind, seed=1)
    rho, beta, lam, alpha = 0.7, 0.05, 0.5, 0.9
    tx = curvax.curveball(loss, rho=rho, beta=beta, damping=lam, learning_rate=alpha,
                          damping_period=0)
    history = run(tx, params, 6, lambda p: dict(predict_fn=predict, targets=targets))
    w = np.asarray(params["w"])
    z = np.zeros(5)
    for k, (params_k, state_k, updates_k) in enumerate(history):
      g = a @ w - b
      z = rho * z - beta * ((a + lam * np.eye(5)) @ z + g)
      w = w + alpha * z
      np.testing.assert_allclose(state_k.z["w"], z, rtol=1e-10, atol=1e-12, err_msg=k)
      np.testing.assert_allclose(updates_k["w"], alpha * z, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(params_k["w"], w, rtol=1e-10, atol=1e-12)
      assert float(state_k.rho) == _f32(rho) and float(state_k.beta) == _f32(beta)


# ------------------------------------------------------- ρ/β and steps vs dense


def test_automatic_rho_beta_solve_eq_19():
  """Each step's ρ, β equal the numpy 2×2 solve of eq. 19 at curvax's own ``w``, ``z``."""
  with jax.enable_x64(True):
    predict, params, targets = _mlp("softmax_cross_entropy")
    lam = 0.5
    tx = curvax.curveball("softmax_cross_entropy", damping=lam, damping_period=0)
    history = run(tx, params, 4, lambda p: dict(predict_fn=predict, targets=targets))
    objective = DenseObjective(predict, params, _ref_softmax_cross_entropy, targets)
    w, z = _flat(params), np.zeros(objective.size)
    for k, (params_k, state_k, _) in enumerate(history):
      ggn, g = objective.ggn(w), objective.gradient(w)
      damped = ggn + lam * np.eye(w.size)
      delta = damped @ z + g
      if k == 0:  # z = 0: the 2×2 system is singular; ρ drops out, β is the 1-D optimum
        assert float(state_k.rho) == 0.0
        expected_beta = (g @ delta) / (delta @ damped @ delta)
        expected_rho = 0.0
      else:
        matrix = np.array([[delta @ damped @ delta, z @ damped @ delta],
                           [z @ damped @ delta, z @ damped @ z]])
        neg_beta, expected_rho = -np.linalg.solve(matrix, [g @ delta, g @ z])
        expected_beta = -neg_beta
        assert abs(expected_rho) > 1e-3  # the test exercises a non-trivial ρ
      np.testing.assert_allclose(state_k.rho, expected_rho, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(state_k.beta, expected_beta, rtol=1e-5)
      z = expected_rho * z - expected_beta * delta
      np.testing.assert_allclose(_flat(state_k.z), z, rtol=1e-8, atol=1e-11)
      w, z = _flat(params_k), _flat(state_k.z)


@pytest.mark.parametrize("rho, beta", [(0.6, None), (None, 0.3)])
def test_one_fixed_coefficient_gives_best_other(rho, beta):
  """With ρ (or β) fixed, the other is the model's best value GIVEN the fixed one."""
  with jax.enable_x64(True):
    predict, params, targets = _mlp("squared_error", seed=1)
    objective = DenseObjective(predict, params, _ref_squared_error, targets)
    tx = curvax.curveball("squared_error", rho=rho, beta=beta, damping=0.3,
                          damping_period=0)
    history = run(tx, params, 3, lambda p: dict(predict_fn=predict, targets=targets))
    records = dense_curveball(objective, _flat(params), 3, damping=0.3, rho=rho,
                              beta=beta, damping_period=0)
    _assert_matches(history, records, check_ratio=False)


@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "squared_error"])
def test_steps_match_dense_reimplementation(loss_name):
  """Three steps (with a λ update on step 2) equal the dense-GGN re-implementation.

  ``α = 1.8`` overshoots the model's minimum, so γ leaves [1/2, 3/2] on step 2 (below
  for cross-entropy, above for squared error) and the λ rule acts.
  """
  with jax.enable_x64(True):
    predict, params, targets = _mlp(loss_name)
    objective = DenseObjective(predict, params, LOSSES[loss_name][1], targets)
    config = dict(damping=0.05, learning_rate=1.8, damping_period=2,
                  damping_factor=0.5)
    tx = curvax.curveball(LOSSES[loss_name][0](), **config)
    history = run(tx, params, 3, lambda p: dict(predict_fn=predict, targets=targets))
    records = dense_curveball(objective, _flat(params), 3, **config)
    _assert_matches(history, records)
    assert records[1]["damping"] != _f32(0.05)  # γ left [1/2, 3/2]: the rule acted


def test_user_gradient_equals_fused_path():
  """Passing the true gradient gives what ``None`` (gradient from the fused product) does."""
  with jax.enable_x64(True):
    predict, params, targets = _mlp("softmax_cross_entropy", seed=2)
    gradient = jax.jit(jax.grad(lambda p: _ref_softmax_cross_entropy(predict(p), targets)))
    tx = curvax.curveball("softmax_cross_entropy", damping=0.5, damping_period=1)
    fused = run(tx, params, 3, lambda p: dict(predict_fn=predict, targets=targets))

    @jax.jit
    def given_step(params, state, grads):
      updates, state = tx.update(grads, state, params, predict_fn=predict, targets=targets)
      return optax.apply_updates(params, updates), state, updates

    p, state = params, tx.init(params)
    for k, (p1, s1, u1) in enumerate(fused):
      p, state, u2 = given_step(p, state, gradient(p))
      np.testing.assert_allclose(_flat(u2), _flat(u1), rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(_flat(p), _flat(p1), rtol=1e-9, atol=1e-12)
      for name, a, b in zip(s1._fields, s1, state):
        np.testing.assert_allclose(_flat(b), _flat(a), rtol=1e-6, atol=1e-12,
                                   err_msg=f"step {k}: {name}")
    # ... and a gradient that is NOT the true one changes the step: it is really used.
    doubled = jax.tree.map(lambda g: 2 * g, gradient(params))
    _, _, wrong = given_step(params, tx.init(params), doubled)
    assert not np.allclose(_flat(wrong), _flat(fused[0][2]), rtol=1e-3)


# ----------------------------------------------------------------- the λ rule


def _exp_problem(w0):
  """1-D ``f(w) = eᵂ − w`` (identity network): ``g = eᵂ − 1``, GGN = Hessian = ``eᵂ``."""
  loss = losses.from_fn(lambda o, t: jnp.sum(jnp.exp(o - t) - (o - t)), name="exp")
  predict = lambda p: p["w"].reshape(1, 1)
  return loss, predict, jnp.zeros((1, 1)), {"w": jnp.asarray([w0])}


def _exp_gamma(w, step, lam):
  """``γ = (f(w + s) − f(w)) / (g s + ½ (H + λ) s²)`` in closed form."""
  f = lambda v: np.exp(v) - v
  return (f(w + step) - f(w)) / ((np.exp(w) - 1) * step
                                 + 0.5 * (np.exp(w) + lam) * step ** 2)


GAMMA_CASES = {
    # name: (w0, rho, beta, damping, min_damping, max_damping, regime, expected factor)
    # Step 2 → 0.5: curvature falls along the step, the model under-predicts: γ ≈ 3.3.
    "above_3/2": (2.0, 0.0, 1.5 / (np.e ** 2 - 1), 1.0, 1e-8, 1e8, "high", 0.9),
    # A tiny step: the model is accurate, γ ≈ 1, λ stays.
    "between": (2.0, 0.0, 0.01 / (np.e ** 2 - 1), 1.0, 1e-8, 1e8, "mid", 1.0),
    # Automatic Newton step from −2 overshoots to ≈ 4.3 where f is huge: γ ≪ 0.
    "below_1/2": (-2.0, None, None, 1e-3, 1e-8, 1e8, "low", 1 / 0.9),
    # The same two moves with λ already at its bound: clipped, unchanged.
    "above_3/2_at_min": (2.0, 0.0, 1.5 / (np.e ** 2 - 1), 1.0, 1.0, 1e8, "high", 1.0),
    "below_1/2_at_max": (-2.0, None, None, 1e-3, 1e-8, 1e-3, "low", 1.0),
}


@pytest.mark.parametrize("case", GAMMA_CASES)
def test_damping_follows_reduction_ratio(case):
  w0, rho, beta, lam, lo, hi, regime, factor = GAMMA_CASES[case]
  with jax.enable_x64(True):
    loss, predict, targets, params = _exp_problem(w0)
    tx = curvax.curveball(loss, rho=rho, beta=beta, damping=lam, damping_period=1,
                          damping_factor=0.9, min_damping=lo, max_damping=hi)
    ((_, state, updates),) = run(tx, params, 1,
                                 lambda p: dict(predict_fn=predict, targets=targets))
    step = float(updates["w"][0])
    gamma = _exp_gamma(w0, step, lam)
    assert {"high": gamma > 1.5, "mid": 0.5 <= gamma <= 1.5, "low": gamma < 0.5}[regime]
    np.testing.assert_allclose(state.reduction_ratio, gamma, rtol=1e-5)
    np.testing.assert_allclose(state.damping, _f32(lam * factor), rtol=1e-7)
    assert _f32(lo) <= float(state.damping) <= _f32(hi)


@pytest.mark.parametrize("period", [0, 1, 3])
def test_damping_rule_on_mlp(period):
  """λ follows γ (from dense matrices) on steps that are multiples of the period only;
  0 disables the rule; λ stays within [min_damping, max_damping]."""
  with jax.enable_x64(True):
    predict, params, targets = _mlp("softmax_cross_entropy", seed=3)
    objective = DenseObjective(predict, params, _ref_softmax_cross_entropy, targets)
    config = dict(damping=0.05, learning_rate=1.7, damping_period=period,
                  damping_factor=0.7, min_damping=0.02, max_damping=0.1)
    tx = curvax.curveball("softmax_cross_entropy", **config)
    history = run(tx, params, 6, lambda p: dict(predict_fn=predict, targets=targets))
    records = dense_curveball(objective, _flat(params), 6, **config)
    _assert_matches(history, records)
    gammas = [r["gamma"] for r in records]
    due = [bool(period) and k % period == 0 for k in range(6)]
    # α = 1.7 overshoots: γ < 1/2 on some step the rule ran on (λ grew) ...
    assert period == 0 or any(g < 0.5 for g, d in zip(gammas, due) if d)
    # ... and on some step it skipped, where acting would have changed λ.
    assert period == 1 or any(g < 0.5 or g > 1.5 for g, d in zip(gammas, due) if not d)
    assert all(_f32(0.02) <= float(s.damping) <= _f32(0.1) for _, s, _ in history)
    if period == 1:  # λ would have reached 0.05 · 0.7 / 0.7⁴ > 0.1: clipped to the max
      assert float(history[-1][1].damping) == _f32(0.1)
    if period == 3:  # γ > 3/2 on step 0: 0.05 · 0.7³ < 0.02, clipped to the min
      assert float(history[0][1].damping) == _f32(0.02)
    if period == 0:
      assert all(float(s.damping) == _f32(0.05) for _, s, _ in history)
      assert all(np.isnan(s.reduction_ratio) for _, s, _ in history)
    else:  # the first step is an evaluation step; γ is kept until the next one
      assert not np.isnan(history[0][1].reduction_ratio)
      assert period == 1 or (float(history[period - 1][1].reduction_ratio)
                             == float(history[0][1].reduction_ratio))


# ------------------------------------------------------ jit, non-finite batches


def test_no_retrace_after_first_step():
  """Six batches, one trace: the state keeps its shapes, dtypes and weak types."""
  rng = np.random.default_rng(0)
  predict_x = jnp.asarray(rng.normal(size=(6, BATCH, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(6, BATCH)))
  _, params, _ = _mlp("softmax_cross_entropy")
  tx = curvax.curveball("softmax_cross_entropy", damping_period=2)
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    predict = lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    updates, state = tx.update(None, state, params, predict_fn=predict, targets=y)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  structure = jax.tree.map(lambda a: (a.shape, a.dtype, getattr(a, "weak_type", False)),
                           state)
  for x, y in zip(predict_x, labels):
    params, state = step(params, state, x, y)
  assert len(traces) == 1
  assert int(state.count) == 6
  assert jax.tree.map(lambda a: (a.shape, a.dtype, getattr(a, "weak_type", False)),
                      state) == structure
  # The state is plain arrays: it survives a flax.serialization round trip.
  restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
  assert type(restored) is type(state)
  for name, a, b in zip(state._fields, state, restored):
    np.testing.assert_array_equal(_flat(a), _flat(b), err_msg=name)


_SKIP_TX = curvax.curveball("squared_error", damping=1.0, damping_period=1)


def _skip_predict(x):
  return lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@functools.partial(jax.jit, static_argnames="user_gradient")
def _skip_step(params, state, x, y, poison, *, user_gradient):
  """One step, fused (``None``) or with the user's gradient (NaN where ``poison``)."""
  predict = _skip_predict(x)
  grads = None
  if user_gradient:
    grads = jax.grad(lambda p: _ref_squared_error(predict(p), y))(params)
    grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
  updates, state = _SKIP_TX.update(grads, state, params, predict_fn=predict, targets=y)
  return optax.apply_updates(params, updates), state, updates


@pytest.mark.parametrize("kind", ["nan_targets", "inf_inputs", "nan_gradient"])
def test_nonfinite_batch_is_skipped(kind):
  """A NaN/inf batch leaves params and state untouched; the next finite batch proceeds.

  ``nan_targets``: the loss is NaN. ``inf_inputs``: the loss stays finite (tanh
  saturates) but every product through the first layer is NaN. ``nan_gradient``: a
  finite batch with a NaN user gradient.
  """
  rng = np.random.default_rng(4)
  _, params, _ = _mlp("squared_error")
  xs = jnp.asarray(rng.normal(size=(2, BATCH, 3)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(2, BATCH, 3)), jnp.float32)
  user_gradient = kind == "nan_gradient"
  step = functools.partial(_skip_step, user_gradient=user_gradient)
  bad_x, bad_y = xs[1], ys[1]
  if kind == "nan_targets":
    bad_y = bad_y.at[1, 0].set(jnp.nan)
  elif kind == "inf_inputs":
    bad_x = bad_x.at[0, 2].set(jnp.inf)
    assert np.isfinite(_ref_squared_error(_skip_predict(bad_x)(params), bad_y))

  params1, state1, _ = step(params, _SKIP_TX.init(params), xs[0], ys[0], False)
  params_bad, state_bad, updates_bad = step(params1, state1, bad_x, bad_y, True)
  assert all(np.all(u == 0) for u in jax.tree.leaves(updates_bad))
  np.testing.assert_array_equal(_flat(params_bad), _flat(params1))
  assert int(state_bad.num_skipped) == 1
  for name in state1._fields:
    if name != "num_skipped":
      np.testing.assert_array_equal(_flat(getattr(state_bad, name)),
                                    _flat(getattr(state1, name)), err_msg=name)
  # Training continues exactly as if the bad batch had never been seen.
  params2, state2, _ = step(params_bad, state_bad, xs[1], ys[1], False)
  params2_ref, state2_ref, _ = step(params1, state1, xs[1], ys[1], False)
  np.testing.assert_array_equal(_flat(params2), _flat(params2_ref))
  assert not np.array_equal(_flat(params2), _flat(params1))
  assert int(state2.count) == 2 and int(state2.num_skipped) == 1
  for name in state1._fields:
    if name != "num_skipped":
      np.testing.assert_array_equal(_flat(getattr(state2, name)),
                                    _flat(getattr(state2_ref, name)), err_msg=name)


def test_mixed_precision_keeps_parameter_dtype():
  """float32 params with a float64 batch (so a float64 loss): z stays float32, and the
  steps still follow the dense float64 reference to float32 accuracy."""
  with jax.enable_x64(True):
    predict64, params64, targets = _mlp("squared_error")
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params64)
    config = dict(damping=1.0, damping_period=2)
    tx = curvax.curveball("squared_error", **config)
    mixed = run(tx, params32, 3, lambda p: dict(predict_fn=predict64, targets=targets))
    objective = DenseObjective(predict64, params32, _ref_squared_error, targets)
    records = dense_curveball(objective, _flat(params32), 3, **config)
    for (p32, s32, _), ref in zip(mixed, records):
      assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((p32, s32.z)))
      np.testing.assert_allclose(_flat(p32), ref["w"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- composition


def test_chain_with_clip_by_global_norm():
  """Clipping acts on the step only; z keeps its unclipped value (dense reference).

  Over three λ evaluations, γ is measured on CurveBall's own step αz, not on the
  clipped update (the rule judges CurveBall's model, whose minimiser αz is).
  """
  with jax.enable_x64(True):
    predict, params, targets = _mlp("softmax_cross_entropy", seed=5)
    objective = DenseObjective(predict, params, _ref_softmax_cross_entropy, targets)
    max_norm = 0.3
    config = dict(damping=0.2, damping_period=2, damping_factor=0.5)
    tx = optax.chain(curvax.curveball("softmax_cross_entropy", **config),
                     optax.clip_by_global_norm(max_norm))
    history = run(tx, params, 6, lambda p: dict(predict_fn=predict, targets=targets))
    clip = lambda s: s * min(1.0, max_norm / np.linalg.norm(s))
    records = dense_curveball(objective, _flat(params), 6, transform_step=clip, **config)
    assert np.linalg.norm(records[0]["z"]) > max_norm  # clipping is active
    assert len({r["damping"] for r in records}) > 1  # the λ rule acted
    for k, ((p, s, u), ref) in enumerate(zip(history, records)):
      np.testing.assert_allclose(_flat(u), ref["update"], rtol=1e-8, atol=1e-11)
      np.testing.assert_allclose(_flat(p), ref["w"], rtol=1e-8, atol=1e-11)
      np.testing.assert_allclose(_flat(s[0].z), ref["z"], rtol=1e-8, atol=1e-11)
      assert float(s[0].damping) == ref["damping"], k
      np.testing.assert_allclose(s[0].reduction_ratio, ref["ratio"], rtol=1e-6)


def test_chain_after_add_decayed_weights():
  """``add_decayed_weights`` before CurveBall: ``g + μw`` is the step's gradient."""
  with jax.enable_x64(True):
    predict, params, targets = _mlp("squared_error", seed=6)
    objective = DenseObjective(predict, params, _ref_squared_error, targets)
    decay = 0.3
    tx = optax.chain(optax.add_decayed_weights(decay),
                     curvax.curveball("squared_error", damping=0.5, damping_period=0))
    history = run(tx, params, 3, lambda p: dict(predict_fn=predict, targets=targets),
                  gradient=jax.grad(lambda p: _ref_squared_error(predict(p), targets)))
    records = dense_curveball(objective, _flat(params), 3, damping=0.5,
                              damping_period=0,
                              gradient=lambda w: objective.gradient(w) + decay * w)
    plain = dense_curveball(objective, _flat(params), 1, damping=0.5, damping_period=0)
    assert not np.allclose(records[0]["update"], plain[0]["update"], rtol=1e-3)
    for (p, s, u), ref in zip(history, records):
      np.testing.assert_allclose(_flat(u), ref["update"], rtol=1e-8, atol=1e-11)
      np.testing.assert_allclose(_flat(p), ref["w"], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("search", ["backtracking", "zoom"])
def test_chain_with_optax_linesearch(search):
  """CurveBall's step scaled by an optax line search: Armijo holds, loss never rises."""
  with jax.enable_x64(True):
    predict, params, targets = _mlp("softmax_cross_entropy", seed=7)
    loss = losses.softmax_cross_entropy()
    if search == "backtracking":
      linesearch = optax.scale_by_backtracking_linesearch(max_backtracking_steps=15)
    else:
      linesearch = optax.scale_by_zoom_linesearch(max_linesearch_steps=15)
    tx = optax.chain(curvax.curveball(loss, damping=0.1, learning_rate=1.0), linesearch)
    value_fn = curvax.objective(loss)
    objective = lambda p: _ref_softmax_cross_entropy(predict(p), targets)

    def extra(p):
      value, grad = jax.value_and_grad(objective)(p)
      return dict(value=value, grad=grad, value_fn=value_fn, predict_fn=predict,
                  targets=targets)

    history = run(tx, params, 3, extra, strong_init=True)
    dense = DenseObjective(predict, params, _ref_softmax_cross_entropy, targets)
    previous = _flat(params)
    for p, s, u in history:
      f0, g0, f1 = dense.value(previous), dense.gradient(previous), dense.value(_flat(p))
      assert f1 <= f0 + 1e-4 * g0 @ _flat(u) + 1e-12 < f0  # Armijo, slope_rtol = 1e-4
      # The update is CurveBall's step α z times the accepted line-search step size.
      np.testing.assert_allclose(_flat(u), float(s[1].learning_rate) * _flat(s[0].z),
                                 rtol=1e-9, atol=1e-12)
      previous = _flat(p)
    assert dense.value(previous) < 0.5 * dense.value(_flat(params))


# ------------------------------------------------------------------------ flax


class _BatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(2)(nn.tanh(x))


class _TrainState(train_state.TrainState):
  batch_stats: Any = None


def _linen_problem():
  model = _BatchNormMLP()
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(2), x)
  return model, x, y, variables


def _train_mode(apply_fn, batch_stats, x):
  """``params -> (outputs, new batch_stats)`` in training mode (batch statistics)."""

  def predict(p):
    out, mutated = apply_fn({"params": p, "batch_stats": batch_stats}, x, train=True,
                            mutable=["batch_stats"])
    return out, mutated["batch_stats"]

  return predict


@jax.jit
def _linen_step(state, x, y):
  predict = _train_mode(state.apply_fn, state.batch_stats, x)
  lin = curvax.linearize(predict, state.params, loss="squared_error", targets=y,
                         has_aux=True)
  updates, opt_state = state.tx.update(None, state.opt_state, state.params,
                                       linearization=lin)
  state = state.replace(step=state.step + 1,
                        params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state, batch_stats=lin.aux)
  return state, lin.loss_value


def test_flax_linen_train_state_with_batchnorm():
  """A TrainState step with BatchNorm: curvature and gradient of the TRAIN-mode network
  (dense float64 reference), batch_stats updated from this batch, loss falls."""
  model, x, y, variables = _linen_problem()
  state = _TrainState.create(apply_fn=model.apply, params=variables["params"],
                             tx=curvax.curveball("squared_error", damping=1.0),
                             batch_stats=variables["batch_stats"])
  first, loss0 = _linen_step(state, x, y)

  # The step equals the dense re-implementation on the train-mode network ...
  with jax.enable_x64(True):
    params64, x64, y64 = jax.tree.map(lambda a: np.asarray(a, np.float64),
                                      (variables["params"], x, y))
    train = lambda p: _train_mode(model.apply, variables["batch_stats"], x64)(p)[0]
    ref = dense_curveball(DenseObjective(train, params64, _ref_squared_error, y64),
                          _flat(params64), 1, damping=1.0)[0]
    evaluate = model.apply({"params": params64, "batch_stats": variables["batch_stats"]},
                           x64, train=False)
    # ... which differs from the eval-mode network (running statistics) here, so
    # curvature or gradient taken from that could not have matched.
    assert not np.allclose(evaluate, train(params64), rtol=0.1)
  np.testing.assert_allclose(_flat(first.params), ref["w"], rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(_flat(first.opt_state.z), ref["z"], rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(loss0, ref["loss"], rtol=1e-5)

  # batch_stats: the running averages moved towards this batch's pre-BN statistics.
  dense_0 = variables["params"]["Dense_0"]
  h = np.asarray(x, np.float64) @ dense_0["kernel"] + dense_0["bias"]
  old = variables["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(first.batch_stats["BatchNorm_0"]["mean"],
                             0.9 * old["mean"] + 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(first.batch_stats["BatchNorm_0"]["var"],
                             0.9 * old["var"] + 0.1 * h.var(0), rtol=1e-5, atol=1e-6)

  # Loss falls over 20 steps on this fixed batch (the logged loss is the step's own).
  state, losses_seen = first, [float(loss0)]
  for _ in range(20):
    state, loss = _linen_step(state, x, y)
    losses_seen.append(float(loss))
  assert losses_seen[-1] < 0.3 * losses_seen[0]
  np.testing.assert_allclose(state.opt_state.loss, losses_seen[-1], rtol=1e-6)
  assert int(state.opt_state.count) == 21


def test_flax_nnx_optimizer_matches_pure_jax():
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(BATCH, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(BATCH, 2)), jnp.float32)

  def make():
    return nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.tanh,
                          nnx.Linear(4, 2, rngs=nnx.Rngs(1)))

  tx = curvax.curveball("squared_error", damping=1.0, damping_period=2)

  # Pure JAX on the split parameters.
  graphdef, params = nnx.split(make(), nnx.Param)
  params = nnx.as_pure(params)
  predict = lambda p: nnx.merge(graphdef, p)(x)
  history = run(tx, params, 3, lambda p: dict(predict_fn=predict, targets=y))

  # nnx.Optimizer, gradient from the fused product (grads=None).
  model = make()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    graph = nnx.graphdef(model)
    optimizer.update(model, None, predict_fn=lambda p: nnx.merge(graph, p)(x), targets=y)

  for k in range(3):
    step(model, optimizer)
    expected = history[k][0]
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(_flat(got), _flat(expected), rtol=1e-5, atol=1e-6,
                               err_msg=f"step {k}")
  np.testing.assert_allclose(optimizer.opt_state.damping[...], history[-1][1].damping)
  assert not np.allclose(_flat(nnx.as_pure(nnx.state(make(), nnx.Param))),
                         _flat(history[-1][0]), rtol=1e-3)


# --------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs, name", [
    (dict(damping=-1.0), r"^damping\b"),
    (dict(damping=0.0), r"^damping\b"),
    (dict(damping_factor=1.0), "damping_factor"),
    (dict(damping_factor=1.5), "damping_factor"),
    (dict(damping_factor=0.0), "damping_factor"),
    (dict(rho=1.5), "rho"),
    (dict(rho=-0.1), "rho"),
    (dict(beta=-1.0), "beta"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(damping_period=-1), "damping_period"),
    (dict(damping=1e-9, min_damping=1e-8), "min_damping"),
    (dict(damping=10.0, max_damping=1.0), "max_damping"),
])
def test_bad_configuration_names_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    curvax.curveball("squared_error", **kwargs)


def test_boundary_configuration_is_accepted():
  for kwargs in (dict(rho=0.0), dict(rho=1.0), dict(damping_period=0),
                 dict(damping=1.0, min_damping=1.0, max_damping=1.0)):
    assert isinstance(curvax.curveball("squared_error", **kwargs),
                      optax.GradientTransformationExtraArgs)


def test_unknown_loss_is_rejected():
  with pytest.raises(ValueError, match="loss"):
    curvax.curveball("hinge")


@pytest.mark.parametrize("missing", ["predict_fn", "targets", "params"])
def test_missing_extra_arguments_name_what_is_missing(missing):
  predict, params, targets = _mlp("squared_error")
  tx = curvax.curveball("squared_error")
  state = tx.init(params)
  args = dict(predict_fn=predict, targets=targets)
  call_params = None if missing == "params" else params
  args.pop(missing, None)
  with pytest.raises(ValueError, match=missing):
    tx.update(None, state, call_params, **args)


def test_linearization_and_predict_fn_together_are_rejected():
  predict, params, targets = _mlp("squared_error")
  tx = curvax.curveball("squared_error")
  lin = curvax.linearize(predict, params, loss="squared_error", targets=targets)
  with pytest.raises(ValueError, match="linearization"):
    tx.update(None, tx.init(params), params, predict_fn=predict, linearization=lin)
