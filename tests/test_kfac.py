"""KFAC / KFLR / KFRA optimisers and Polyak averaging against hand computations.

The references are numpy: Kronecker factors from a hand-written forward pass, the full
GGN from jax.jacobian, damped inverses from dense solves, and the appendix's rules
(kfra_kflr.md App. C) written out directly.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import curvax
from curvax import kron, losses
from curvax.problems import datasets, mixture, models
from tests import dense_reference as ref

BATCH = 3


def _problem(seed=0, batch=BATCH):
  """Pure JAX, tagged: a bias-free first layer, sigmoid, a layer with bias (float64)."""
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {"w1": jax.random.normal(k1, (4, 5), jnp.float64),
            "w2": jax.random.normal(k2, (5, 3), jnp.float64),
            "b2": 0.1 * jax.random.normal(k3, (3,), jnp.float64)}
  x = jax.random.normal(k4, (batch, 4), jnp.float64)
  y = jax.random.randint(k5, (batch,), 0, 3)
  predict = lambda p: kron.dense(jax.nn.sigmoid(kron.dense(x, p["w1"])), p["w2"], p["b2"])
  return params, x, y, predict


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def _unflat(w):
  """:func:`_problem`'s parameters from their flat (ravel_pytree) order b2, w1, w2."""
  return {"b2": w[0:3], "w1": w[3:23].reshape(4, 5), "w2": w[23:38].reshape(5, 3)}


def _net(params, x):
  return jax.nn.sigmoid(x @ params["w1"]) @ params["w2"] + params["b2"]


class _Hand:
  """Everything of kfra_kflr.md App. C at ``params``, in numpy (flat order b2, w1, w2)."""

  def __init__(self, params, x, y, eta):
    if not isinstance(params, dict):
      params = _unflat(params)
    w1, w2, b2 = (np.asarray(params[k]) for k in ("w1", "w2", "b2"))
    batch = x.shape[0]
    h1 = np.asarray(x) @ w1
    a1 = 1 / (1 + np.exp(-h1))
    out = a1 @ w2 + b2
    p = np.exp(out - out.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    hess = [np.diag(pn) - np.outer(pn, pn) for pn in p]  # softmax CE, per example
    jac_h1 = [w2.T * (a1[n] * (1 - a1[n]))[None, :] for n in range(batch)]  # ∂o_n/∂h1_n
    self.g1 = sum(j.T @ h @ j for j, h in zip(jac_h1, hess)) / batch
    self.g2 = sum(hess) / batch
    self.q1 = np.asarray(x).T @ np.asarray(x) / batch
    a1b = np.concatenate([a1, np.ones((batch, 1))], axis=1)
    self.q2 = a1b.T @ a1b / batch
    w = _flat(params)
    value, grad, ggn = _dense_terms(w, x, y)
    self.eta = eta
    self.w = w
    self.value = float(value) + 0.5 * eta * w @ w
    self.grad = np.asarray(grad) + eta * w
    self.ggn = np.asarray(ggn)
    self.objective = lambda v: float(_dense_terms(v, x, y)[0]) + 0.5 * eta * v @ v

  def direction(self, gamma):
    """δ̃ = C̃⁻¹ ∇f with the factored damping of eq. 36–38 (dense solves)."""
    k = gamma + self.eta
    g = self.grad
    v1 = g[3:23].reshape(4, 5)
    v2 = np.concatenate([g[23:38].reshape(5, 3), g[0:3][None]], axis=0)
    out = []
    for q, gg, v in ((self.q1, self.g1, v1), (self.q2, self.g2, v2)):
      omega = np.sqrt((np.trace(q) / q.shape[0]) / (np.trace(gg) / gg.shape[0]))
      damped = np.kron(q + omega * np.sqrt(k) * np.eye(q.shape[0]),
                       gg + np.sqrt(k) / omega * np.eye(gg.shape[0]))
      out.append(np.linalg.solve(damped, v.reshape(-1)).reshape(v.shape))
    x1, x2 = out
    return np.concatenate([x2[5], x1.reshape(-1), x2[:5].reshape(-1)])

  def curvature(self, tau):
    return self.ggn + (tau + self.eta) * np.eye(self.w.size)

  def step(self, gamma, tau):
    """``(δ*, α*, f̂(δ*))`` of eq. 39–41."""
    d = self.direction(gamma)
    c = self.curvature(tau)
    alpha = -(d @ self.grad) / (d @ c @ d)
    step = alpha * d
    return step, alpha, self.grad @ step + 0.5 * step @ c @ step


@jax.jit
def _dense_terms(w, x, y):
  """Loss, gradient and GGN of the :func:`_problem` network at flat (b2, w1, w2)."""
  objective = lambda v: ref.cross_entropy(_net(_unflat(v), x), y)
  value, grad = jax.value_and_grad(objective)(w)
  return value, grad, _ggn(w, _unflat, x, y)


def _ggn(v, unravel, x, y):
  net = lambda u: _net(unravel(u), x)
  out = net(v)
  jac = jax.jacobian(lambda u: net(u).reshape(-1))(v)
  hess = jax.hessian(lambda o: ref.cross_entropy(o.reshape(out.shape), y))(out.reshape(-1))
  return jac.T @ hess @ jac


def _jit_update(tx):
  return jax.jit(lambda u, s, p, predict, y: tx.update(u, s, p, predict_fn=predict,
                                                      targets=y), static_argnums=3)


# --------------------------------------------------------- appendix rules by hand


def test_first_step_is_alpha_star_times_damped_kronecker_direction_and_tau_rule():
  """δ* = α*δ̃ (eq. 33–41) with η; ρ (eq. 42) and τ's LM update (App. C.3.1)."""
  with jax.enable_x64(True):
    params, x, y, predict = _problem()
    gamma, tau, eta = 0.375, 0.625, 1 / 64  # exact in float32, the dtype of the state
    tx = curvax.kflr(losses.softmax_cross_entropy(), gamma=gamma, tau=tau,
                     weight_decay=eta, tau_period=1, gamma_period=0)
    updates, state = _jit_update(tx)(None, tx.init(params), params, predict, y)
    hand = _Hand(params, x, y, eta)
    step, alpha, predicted = hand.step(gamma, tau)
    np.testing.assert_allclose(_flat(updates), step, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(state.alpha, alpha, rtol=1e-5)
    rho = (hand.objective(hand.w + step) - hand.value) / predicted
    np.testing.assert_allclose(state.reduction_ratio, rho, rtol=1e-5)
    omega_tau = 0.95 ** 1  # ω_τ = 0.95^{T_τ}
    expected_tau = tau * omega_tau if rho > 0.75 else tau / omega_tau
    np.testing.assert_allclose(state.tau, expected_tau, rtol=1e-6)
    np.testing.assert_allclose(state.loss, hand.value - 0.5 * eta * hand.w @ hand.w,
                               rtol=1e-6)
    # The factors are KFLR's exact ones: Q̃ from the activations, 𝒢̃ = mean J_hᵀ H J_h.
    leaves = jax.tree.leaves(params)  # b2, w1, w2
    np.testing.assert_allclose(state.factors.q[1][:4, :4], hand.q1, rtol=1e-10)
    np.testing.assert_allclose(state.factors.q[1][4], 0.0)  # unused bias slot
    np.testing.assert_allclose(state.factors.g[1], hand.g1, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(state.factors.q[2], hand.q2, rtol=1e-10)
    np.testing.assert_allclose(state.factors.g[2], hand.g2, rtol=1e-8, atol=1e-14)
    assert state.factors.q[0] is None and len(leaves) == 3


def test_gamma_rule_never_picks_a_candidate_with_a_non_finite_model_value():
  """A failed inverse gives a NaN model value; argmin alone would pick it (NaN compares
  as the minimum) and every later batch would be skipped on the same choice."""
  from curvax import damping
  for values, best in (([np.nan, 2.0, 1.0], 2), ([1.0, np.nan, 3.0], 0),
                       ([np.inf, -np.inf, 0.5], 2), ([3.0, 2.0, 1.0], 2)):
    assert int(damping.best_candidate(jnp.asarray(values))) == best
    assert int(jnp.argmin(jnp.asarray(values))) != best or np.isfinite(values).all()


# ------------------------------------------- several steps: schedules, rules, skips


def _blocks_of(flat):
  """The two Kronecker blocks of a flat (b2, w1, w2) vector: w1 as (4, 5), then w2 with
  the bias as its last input row, (6, 3)."""
  return flat[3:23].reshape(4, 5), np.concatenate([flat[23:38].reshape(5, 3),
                                                   flat[0:3][None]], axis=0)


def _from_blocks(x1, x2):
  return np.concatenate([x2[5], x1.reshape(-1), x2[:5].reshape(-1)])


def _damped_inverses(q, g, k):
  """Eq. 36–38 with dense inverses."""
  omega = np.sqrt((np.trace(q) / q.shape[0]) / (np.trace(g) / g.shape[0]))
  return (np.linalg.inv(q + omega * np.sqrt(k) * np.eye(q.shape[0])),
          np.linalg.inv(g + np.sqrt(k) / omega * np.eye(g.shape[0])))


class _HandRun:
  """kfra_kflr.md App. C over several batches, in numpy: KFLR factors' moving averages
  updated every ``factor_period`` steps (kept in between), inverses refreshed every ``inverse_period`` steps and on γ-rule steps (stale in
  between), momentum's 2×2 model, the τ rule every ``tau_period`` steps (a non-finite
  trial loss rejects the step), the greedy γ rule every ``gamma_period`` steps, the
  damping bounds, schedules read at the count, and skipped (non-finite) batches, which
  leave the count — hence every periodic rule — where it was. Records which way τ and
  γ moved and whether a bound changed a value that was used."""

  def __init__(self, params, gamma, tau, hp):
    self.w = _flat(params)
    self.hp = hp
    self.gamma, self.tau = float(np.float32(gamma)), float(np.float32(tau))
    self.count, self.rejected, self.skipped = 0, 0, 0
    self.velocity = np.zeros_like(self.w)
    self.factors = self.inverse = None
    self.alpha = self.mu = 0.0
    self.ratio = np.nan
    self.events = set()

  def step(self, x, y, *, poison=False, skip=False):
    if skip:  # a non-finite batch: nothing changes
      self.skipped += 1
      return np.zeros_like(self.w)
    hp, count = self.hp, self.count
    at = lambda name: float(hp[name](count))
    rate, decay, eta = at("learning_rate"), at("factor_decay"), at("weight_decay")
    low, high = hp["min_damping"], hp["max_damping"]
    hand = _Hand(self.w, x, y, eta)
    batch = [hand.q1, hand.g1, hand.q2, hand.g2]
    self.loss = hand.value - 0.5 * eta * self.w @ self.w
    if count % hp["factor_period"] == 0:
      self.factors = batch if count == 0 else [decay * f + (1 - decay) * b
                                               for f, b in zip(self.factors, batch)]
    else:
      self.events.add("stale factors")
    q1, g1, q2, g2 = self.factors
    invert = lambda gamma: (_damped_inverses(q1, g1, gamma + eta),
                            _damped_inverses(q2, g2, gamma + eta))
    curvature = hand.curvature(self.tau)

    def candidate(inverse):
      (qi1, gi1), (qi2, gi2) = inverse
      v1, v2 = _blocks_of(hand.grad)
      d = _from_blocks(qi1 @ v1 @ gi1, qi2 @ v2 @ gi2)
      dirs = [d] + ([self.velocity] if self.velocity.any() else [])
      m = np.array([[a @ curvature @ b for b in dirs] for a in dirs])
      b = np.array([hand.grad @ a for a in dirs])
      coef = -np.linalg.solve(m, b)
      step = sum(c * a for c, a in zip(coef, dirs))
      value = b @ coef + 0.5 * coef @ m @ coef
      return step, coef[0], coef[1] if len(coef) > 1 else 0.0, value

    if count % hp["gamma_period"] == 0:
      omega = 0.95 ** hp["gamma_period"]
      raw = [self.gamma * omega, self.gamma, self.gamma / omega]
      gammas = list(np.clip(raw, low, high))
      results = [(candidate(invert(g)), invert(g)) for g in gammas]
      best = int(np.argmin([r[0][3] for r in results]))
      (step, alpha, mu, _), self.inverse = results[best]
      self.events.add("gamma " + ("down" if gammas[best] < self.gamma else
                                  "up" if gammas[best] > self.gamma else "kept"))
      if gammas[best] != raw[best]:
        self.events.add("gamma clipped")
      self.gamma = float(np.float32(gammas[best]))
    else:
      if count % hp["inverse_period"] == 0:
        self.inverse = invert(self.gamma)
      else:
        self.events.add("stale inverses")
      step, alpha, mu, _ = candidate(self.inverse)
    step = rate * step
    taken = True
    if (count + 1) % hp["tau_period"] == 0:
      predicted = hand.grad @ step + 0.5 * step @ curvature @ step
      trial = np.nan if poison else hand.objective(self.w + step)
      ratio = (trial - hand.value) / predicted if np.isfinite(trial) else -np.inf
      taken = bool(np.isfinite(trial))
      omega = 0.95 ** hp["tau_period"]
      raw = self.tau * omega if ratio > 0.75 else self.tau / omega
      tau = float(np.clip(raw, low, high))
      self.events.add("tau " + ("down" if tau < self.tau else "up" if tau > self.tau
                                else "kept"))
      if tau != raw:
        self.events.add("tau clipped")
      self.tau, self.ratio = float(np.float32(tau)), ratio
    self.alpha, self.mu = alpha, mu
    self.count += 1
    if not taken:
      self.rejected += 1
      self.events.add("rejected")
      return np.zeros_like(self.w)
    self.w = self.w + step
    self.velocity = step
    return step

  def assert_matches(self, state, *, inverses=True):
    np.testing.assert_allclose(
        [state.gamma, state.tau], [self.gamma, self.tau], rtol=1e-6)
    assert (int(state.count), int(state.num_rejected), int(state.num_skipped)) == (
        self.count, self.rejected, self.skipped)
    np.testing.assert_allclose([state.alpha, state.mu], [self.alpha, self.mu],
                               rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(state.reduction_ratio, self.ratio, rtol=1e-5)
    np.testing.assert_allclose(state.loss, self.loss, rtol=1e-6)
    np.testing.assert_allclose(_flat(state.velocity), self.velocity, rtol=1e-7,
                               atol=1e-13)
    q1, g1, q2, g2 = self.factors
    np.testing.assert_allclose(state.factors.q[1][:4, :4], q1, rtol=1e-9)
    np.testing.assert_allclose(state.factors.g[1], g1, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(state.factors.q[2], q2, rtol=1e-9)
    np.testing.assert_allclose(state.factors.g[2], g2, rtol=1e-8, atol=1e-14)
    if inverses:
      (qi1, gi1), (qi2, gi2) = self.inverse
      np.testing.assert_allclose(state.inverse.q[1][:4, :4], qi1, rtol=1e-7)
      np.testing.assert_allclose(state.inverse.g[1], gi1, rtol=1e-7)
      np.testing.assert_allclose(state.inverse.q[2], qi2, rtol=1e-7)
      np.testing.assert_allclose(state.inverse.g[2], gi2, rtol=1e-7)


_SCHEDULES = dict(learning_rate=lambda c: 1.0 / (1.0 + 0.25 * c),
                  factor_decay=lambda c: jnp.where(c % 2 == 0, 0.5, 0.8),
                  weight_decay=lambda c: (1 + c % 3) / 128)


def test_schedules_periodic_rules_rejected_and_skipped_steps_against_a_hand_run():
  """Steps 0–8 of KFLR with momentum against :class:`_HandRun`: the factors' moving
  average updated every third step, inverses stale between refreshes (period 2), the τ rule (period
  2) and the γ rule (period 3) moving both ways and clipped at the bounds, a step whose
  trial loss is NaN rejected, a NaN batch shifting every periodic rule by one batch;
  learning rate, factor decay and weight decay are schedules of the count, and the
  bounds are injected arrays (``optax.inject_hyperparams``), changed between runs."""
  with jax.enable_x64(True):
    params, *_ = _problem()
    periods = dict(factor_period=3, inverse_period=2, tau_period=2, gamma_period=3)
    # Schedules passed through as such (static): optax would evaluate them at its own
    # count, which also counts skipped batches.
    tx = optax.inject_hyperparams(curvax.kflr, static_args=tuple(_SCHEDULES))(
        loss=losses.softmax_cross_entropy(), momentum=True, momentum_bounds=None,
        gamma=1e-2, min_damping=1e-3, max_damping=8.0, min_tau=0.0, **_SCHEDULES,
        **periods)

    @jax.jit
    def step(params, state, x, y, poison):
      anchor = jnp.sum(params["w1"])

      def predict(p):  # NaN wherever w1 moved, if poisoned: the trial loss
        out = kron.dense(jax.nn.sigmoid(kron.dense(x, p["w1"])), p["w2"], p["b2"])
        return out + jnp.where(poison & (jnp.sum(p["w1"]) != anchor), jnp.nan, 0.0)

      return tx.update(None, state, params, predict_fn=predict, targets=y)

    # (batch seed, poisoned, NaN batch): count 1 is a τ step (rejected), the NaN batch
    # arrives at count 3 (a γ step), so the γ rule runs on the next batch.
    plan = [(0, False, False), (1, True, False), (2, False, False), (3, False, True),
            (4, False, False), (5, False, False), (6, False, False), (7, False, False),
            (8, False, False)]
    events = set()
    # Run 1: γ and τ rise onto max_damping; run 2: γ falls, then rises, τ both ways.
    for gamma, tau, low, high in ((4.0, 4.0, 1e-3, 4.2), (4.0, 1e-3, 1e-3, 8.0)):
      state = tx.init(params)
      state.hyperparams.update(min_damping=jnp.asarray(low), max_damping=jnp.asarray(high))
      state = state._replace(inner_state=state.inner_state._replace(
          gamma=jnp.float32(gamma), tau=jnp.float32(tau)))
      hand = _HandRun(params, gamma, tau, dict(_SCHEDULES, min_damping=low,
                                               max_damping=high, **periods))
      p = params
      for seed, poison, nan in plan:
        _, x, y, _ = _problem(seed=seed + 10)
        if nan:
          x = x.at[0, 0].set(jnp.nan)
        updates, state = step(p, state, x, y, poison)
        expected = hand.step(x, y, poison=poison, skip=nan)
        np.testing.assert_allclose(_flat(updates), expected, rtol=1e-7, atol=1e-13)
        hand.assert_matches(state.inner_state, inverses=not nan)
        p = optax.apply_updates(p, updates)
      events |= hand.events
    assert events >= {"gamma down", "gamma up", "gamma clipped", "tau down", "tau up",
                      "tau clipped", "stale inverses", "stale factors", "rejected"}, events


# ------------------------------------------------------ jit, NaN batches, training


class _SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _images(seed=0, batch=64):
  x = jax.random.normal(jax.random.PRNGKey(seed), (batch, 6, 6, 1))
  y = (jnp.sum(x[:, :3, :, 0], axis=(1, 2)) > 0).astype(jnp.int32) + (
      jnp.sum(x[:, :, :3, 0], axis=(1, 2)) > 0)
  return x, y


def _classification(seed=0, batch=64):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (batch, 8))
  y = jnp.argmax(jnp.tanh(x @ jax.random.normal(kw, (8, 3))), axis=-1)
  return x, y


ESTIMATORS = {
    "kfac": lambda loss, **kw: curvax.kfac(loss, **kw),
    "kflr": lambda loss, **kw: curvax.kflr(loss, **kw),
    "kfra": lambda loss, **kw: curvax.kfra(loss, activations=jnp.tanh, **kw),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_trains_without_retracing_and_skips_non_finite_batches(name):
  """KFAC on a CNN (KFC factors), KFLR and KFRA on an MLP."""
  if name == "kfac":
    (x, y), model = _images(), _SmallCNN()
  else:
    (x, y), model = _classification(), models.MLP(features=(16, 3), activation=jnp.tanh)
  loss = losses.softmax_cross_entropy()
  tx = ESTIMATORS[name](loss, tau_period=2, gamma_period=3, inverse_period=2)
  params = model.init(jax.random.PRNGKey(1), x[:1])
  traces = []

  @jax.jit
  def step(params, state, xb, yb):
    traces.append(None)
    updates, state = tx.update(None, state, params,
                               predict_fn=lambda p: model.apply(p, xb), targets=yb)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  start = float(loss.value(model.apply(params, x), y))
  for i in range(12):
    params, state = step(params, state, x[16 * (i % 4):16 * (i % 4 + 1)],
                         y[16 * (i % 4):16 * (i % 4 + 1)])
  assert len(traces) == 1
  end = float(loss.value(model.apply(params, x), y))
  assert end < 0.5 * start, (start, end)
  assert int(state.count) == 12 and int(state.num_skipped) == 0
  assert np.isfinite(float(state.reduction_ratio))

  bad = x[:16].at[3].set(jnp.nan)
  chex_equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  # Count 12 is an inverse-refresh (and γ-rule) step: a skipped batch may leave
  # refreshed inverses behind, which the retried refresh at the same count replaces.
  new_params, new_state = step(params, state, bad, y[:16])
  assert len(traces) == 1
  assert int(new_state.num_skipped) == 1
  chex_equal(new_params, params)
  chex_equal(new_state._replace(num_skipped=state.num_skipped, inverse=state.inverse),
             state)
  # Count 13 reads the stored inverses: a skipped batch leaves everything unchanged.
  params, state = step(params, state, x[:16], y[:16])
  new_params, new_state = step(params, state, bad, y[:16])
  assert int(state.count) == 13 and int(new_state.num_skipped) == 1
  chex_equal(new_params, params)
  chex_equal(new_state._replace(num_skipped=state.num_skipped), state)


# -------------------------------------------------------------------- optax.chain


def test_in_optax_chain_with_clipping_and_a_line_search():
  with jax.enable_x64(True):
    params, x, y, predict = _problem(seed=3, batch=8)
    loss = losses.softmax_cross_entropy()
    objective = lambda p: ref.cross_entropy(predict(p), y)
    tx = optax.chain(curvax.kflr(loss), optax.clip_by_global_norm(10.0),
                     optax.scale_by_backtracking_linesearch(max_backtracking_steps=10),
                     curvax.polyak())
    value_fn = curvax.objective(loss)

    @jax.jit
    def step(p, s):
      value, grad = jax.value_and_grad(objective)(p)
      u, s = tx.update(None, s, p, value=value, grad=grad, value_fn=value_fn,
                       predict_fn=predict, targets=y)
      return optax.apply_updates(p, u), s

    state = tx.init(params)
    start = p = params
    history = []
    for _ in range(5):
      previous = p
      p, state = step(p, state)
      assert objective(p) <= objective(previous) + 1e-12
      history.append(p)
    assert objective(p) < 0.5 * objective(start)
    # Polyak averaging: the exact mean of the first iterates (β_t = 1 − 1/t for t ≤ 20).
    mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *history)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
                 curvax.averaged_params(state), mean)


def test_polyak_caps_the_decay_and_leaves_updates_unchanged():
  tx = curvax.polyak()
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  average, expected = None, 0.0
  for t in range(1, 31):
    update = {"w": jnp.ones(())}
    out, state = tx.update(update, state, params)
    assert out is update
    params = optax.apply_updates(params, update)
    beta = min(0.95, 1 - 1 / t)
    expected = beta * expected + (1 - beta) * float(params["w"])
  np.testing.assert_allclose(curvax.averaged_params(state)["w"], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="params are required"):
    tx.update({"w": jnp.ones(())}, state)
  with pytest.raises(ValueError, match="exactly one"):
    curvax.averaged_params((optax.EmptyState(),))


# -------------------------------------------------------------------------- nnx


class _NnxTagged(nnx.Module):
  """A flax.nnx model whose layers are marked with curvax.kron.dense."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 4, rngs=rngs)
    self.l2 = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h = kron.dense(x, self.l1.kernel[...], self.l1.bias[...])
    return kron.dense(jnp.tanh(h), self.l2.kernel[...], self.l2.bias[...])


def test_flax_nnx_optimizer_with_tagged_layers_matches_pure_jax():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  y = jax.random.randint(jax.random.PRNGKey(1), (8,), 0, 2)
  tx = curvax.kflr(losses.softmax_cross_entropy(), tau_period=0, gamma_period=0)
  model = _NnxTagged(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)
  state = tx.init(params)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    graph = nnx.graphdef(model)
    optimizer.update(model, None, predict_fn=lambda p: nnx.merge(graph, p)(x), targets=y)

  pure = jax.jit(lambda p, s: tx.update(None, s, p,
                                        predict_fn=lambda q: nnx.merge(graphdef, q)(x),
                                        targets=y))
  for _ in range(2):
    step(model, optimizer)
    updates, state = pure(params, state)
    params = optax.apply_updates(params, updates)
  got = nnx.as_pure(nnx.state(model, nnx.Param))
  np.testing.assert_allclose(_flat(got), _flat(params), rtol=1e-5, atol=1e-6)
  assert int(optimizer.opt_state.count[...]) == 2


# ------------------------------------------------------- optax.inject_hyperparams


def test_inject_hyperparams_with_default_arguments_matches_constants():
  """``optax.inject_hyperparams(curvax.kfac)`` injects every numeric argument, the
  default integers included, as (traced) arrays; two steps (count 1: a τ step with
  stale inverses; a γ period of 0 disables the rule) equal the constant solver's."""
  with jax.enable_x64(True):
    params, _, y, predict = _problem(batch=4)
    settings = dict(learning_rate=0.5, factor_decay=0.8, tau_period=2, gamma_period=0,
                    inverse_period=2, gamma=1e-2)
    runs = []
    for tx in (curvax.kfac(losses.softmax_cross_entropy(), **settings),
               optax.inject_hyperparams(curvax.kfac)(
                   loss=losses.softmax_cross_entropy(),
                   **{k: jnp.asarray(v) for k, v in settings.items()})):
      update = jax.jit(lambda p, s, tx=tx: tx.update(None, s, p, predict_fn=predict,
                                                    targets=y))
      p, state = params, tx.init(params)
      for _ in range(2):
        updates, state = update(p, state)
        p = optax.apply_updates(p, updates)
      runs.append((p, getattr(state, "inner_state", state)))
    (p0, s0), (p1, s1) = runs
    np.testing.assert_allclose(_flat(p1), _flat(p0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose([s1.gamma, s1.tau, s1.reduction_ratio],
                               [s0.gamma, s0.tau, s0.reduction_ratio], rtol=1e-10)
    assert float(s0.tau) != 1e-2 and float(s0.gamma) == np.float32(1e-2)


# -------------------------------------------------------------------- bad inputs


@jax.enable_x64(True)
def test_momentum_coefficient_respects_its_bounds():
  """μ stays in ``momentum_bounds`` (a degenerate interval pins it), and ``None`` gives
  the free 2×2 solve, which on this problem leaves [0, 1] within a few steps."""
  params, x, y, predict = _problem()
  mus = {}
  for bounds in ((0.0, 1.0), (0.25, 0.25), None):
    tx = curvax.kflr(losses.softmax_cross_entropy(), momentum_bounds=bounds,
                     learning_rate=0.5)
    update = jax.jit(lambda p, s, tx=tx: tx.update(None, s, p, predict_fn=predict,
                                                   targets=y))
    p, state, mus[bounds] = params, tx.init(params), []
    for _ in range(6):
      updates, state = update(p, state)
      p = optax.apply_updates(p, updates)
      mus[bounds].append(float(state.mu))
  assert all(0.0 <= mu <= 1.0 for mu in mus[(0.0, 1.0)])
  np.testing.assert_array_equal(mus[(0.25, 0.25)][1:], 0.25)
  assert any(not 0.0 <= mu <= 1.0 for mu in mus[None])


@jax.enable_x64(True)
def test_bad_arguments_are_clear_errors():
  loss = losses.softmax_cross_entropy()
  params, x, y, predict = _problem()
  tx = curvax.kflr(loss)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"missing extra argument\(s\) \['targets'\]"):
    tx.update(None, state, params, predict_fn=predict)
  with pytest.raises(ValueError, match="params are required"):
    tx.update(None, state, predict_fn=predict, targets=y)
  with pytest.raises(ValueError, match="activations= is required"):
    curvax.kfra(loss)
  with pytest.raises(ValueError, match="no predictive distribution"):
    curvax.kfac(losses.from_fn(lambda o, t: jnp.sum((o - t) ** 2)))
  for kwargs, match in ((dict(gamma=0.0), "gamma"), (dict(factor_decay=1.0), "factor_decay"),
                        (dict(inverse_period=0), "inverse_period"),
                        (dict(factor_period=0), "factor_period"),
                        (dict(fallback="zero"), "fallback"),
                        (dict(tau_period=-1), "tau_period"),
                        (dict(momentum_bounds=(1.0, 0.0)), "low <= high"),
                        (dict(momentum_bounds=0.5), "momentum_bounds must be None")):
    with pytest.raises(ValueError, match=match):
      curvax.kflr(loss, **kwargs)
  for factory in (curvax.kfac, curvax.kflr, curvax.kfra):
    with pytest.raises(TypeError, match=rf"curvax\.{factory.__name__}\(\) .*'damping'.*"
                                        r"gamma=.*tau="):
      factory(loss, damping=1e-3, activations=jnp.tanh) if factory is curvax.kfra else \
          factory(loss, damping=1e-3)
  with pytest.raises(TypeError, match="did you mean 'learning_rate'"):
    curvax.kflr(loss, learnig_rate=0.5)
  with pytest.raises(TypeError, match="boolean"):
    curvax.kflr(loss, learning_rate=True)
  with pytest.raises(TypeError, match="inverse_period must be an integer"):
    curvax.kflr(loss, inverse_period=2.0)
  # Gradients that are not shaped like the params: named, not an IndexError.
  mismatch = r"curvax.kflr: the gradient \(updates\) "
  with pytest.raises(ValueError, match=mismatch + "does not have the structure"):
    tx.update({"w1": params["w1"]}, state, params, predict_fn=predict, targets=y)
  with pytest.raises(ValueError, match=mismatch + r"has shape .* at \['w2'\]"):
    tx.update(dict(params, w2=params["w2"].T), state, params, predict_fn=predict,
              targets=y)
  # num_samples sets shapes: injected (traced), it is refused with the way out.
  injected = optax.inject_hyperparams(curvax.kfac)(loss=loss, num_samples=2)
  with pytest.raises(ValueError, match="static_args='num_samples'"):
    jax.jit(lambda s: injected.update(None, s, params, predict_fn=predict, targets=y))(
        injected.init(params))
  with pytest.raises(TypeError, match="static_args='activations'"):
    optax.inject_hyperparams(curvax.kfra)(loss=loss, activations=jnp.tanh).init(params)
  untagged = lambda p: jax.nn.sigmoid(x @ p["w1"]) @ p["w2"] + p["b2"]
  with pytest.raises(ValueError, match="found no Dense or Conv layer"):
    tx.update(None, state, params, predict_fn=untagged, targets=y)


# ------------------------------------------- non-exponential family (kfra_kflr.md §5.2)


def _mixture_problem(seed=0, batch=1):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = {"w1": jax.random.normal(k1, (4, 5), jnp.float64),
            "b1": 0.1 * jax.random.normal(k2, (5,), jnp.float64),
            "w2": 2 * jax.random.normal(k3, (5, 3), jnp.float64)}
  x = jax.random.normal(k4, (batch, 4), jnp.float64)
  predict = lambda p: kron.dense(jnp.tanh(kron.dense(x, p["w1"], p["b1"])), p["w2"])
  return params, predict


def _mixture_dense(predict, params, y):
  """Output Jacobian, H_L = ∇²(−log p) at the data, its PSD part and the Fisher."""
  w, unravel = ravel_pytree(params)
  nll = lambda h, t: -mixture.log_likelihood(h, t)
  h = predict(params)[0]
  jac = np.asarray(jax.jacobian(lambda v: predict(unravel(v))[0])(w))
  hess = np.asarray(jax.hessian(nll)(h, y))
  vals, vecs = np.linalg.eigh(hess)
  psd = (vecs * np.maximum(vals, 0)) @ vecs.T
  p1 = float(mixture.probability_of_one(h))
  fisher = sum(prob * np.outer(g, g) for prob, g in (
      (1 - p1, np.asarray(jax.grad(nll)(h, 0.0))), (p1, np.asarray(jax.grad(nll)(h, 1.0)))))
  return jac, hess, psd, fisher, p1


def test_mixture_loss_kflr_and_kfra_give_the_psd_ggn_blocks():
  """With one example, Q ⊗ 𝒢 = block of Jᵀ (H_L)₊ J; H_L itself is indefinite."""
  with jax.enable_x64(True):
    params, predict = _mixture_problem()
    y = jnp.array([1.0])
    loss = mixture.mixture_of_binary_classifiers()
    jac, hess, psd, _, _ = _mixture_dense(predict, params, 1.0)
    assert np.linalg.eigvalsh(hess).min() < -1e-6  # not PSD: the GGN needs (H_L)₊
    ggn = jac.T @ psd @ jac
    info = {}

    def run(p):
      cap = kron.capture(predict, p, loss=loss, targets=y)
      info["blocks"] = cap.blocks
      u = jnp.arange(3.0)[None] + 1
      return (kron.kflr_factors(cap), kron.kfra_factors(cap, jnp.tanh),
              loss.hessian_vp(cap.lin.outputs, y, u))

    kflr_est, kfra_est, hvp = jax.jit(run)(params)
    np.testing.assert_allclose(hvp[0], psd @ np.arange(1.0, 4.0), rtol=1e-10)
    offsets = np.concatenate([[0], np.cumsum([l.size for l in jax.tree.leaves(params)])])
    for estimate in (kflr_est, kfra_est):
      for block, q, g in zip(info["blocks"], estimate.q, estimate.g):
        index = np.asarray([offsets[block.kernel] + i * block.out_dim + j
                            if i < block.in_dim else offsets[block.bias] + j
                            for i in range(block.q_dim) for j in range(block.out_dim)])
        np.testing.assert_allclose(np.kron(q, g), ggn[np.ix_(index, index)], rtol=1e-8,
                                   atol=1e-12)


def test_mixture_loss_kfac_estimates_the_fisher_not_the_ggn():
  """KFAC's exact expectation over y ~ p_θ(y|x) is the Fisher F = E_θ[∇ℓ∇ℓᵀ] ≠ (H_L)₊."""
  with jax.enable_x64(True):
    params, predict = _mixture_problem(seed=1)
    loss = mixture.mixture_of_binary_classifiers()
    _, _, psd, fisher, p1 = _mixture_dense(predict, params, 0.0)

    def run(p):
      cap = kron.capture(predict, p, loss=loss, targets=jnp.array([0.0]))
      per_y = [kron.factors.from_columns(
          cap, kron.factors.sampled_columns(cap, jnp.array([t]))[None]).g[-1]
               for t in (0.0, 1.0)]
      return per_y, kron.kflr_factors(cap).g[-1]

    (g0, g1), g_kflr = jax.jit(run)(params)
    expected_kfac = (1 - p1) * np.asarray(g0) + p1 * np.asarray(g1)
    np.testing.assert_allclose(expected_kfac, fisher, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(g_kflr, psd, rtol=1e-9, atol=1e-14)
    assert np.linalg.norm(fisher - psd) > 0.1 * np.linalg.norm(psd)


@pytest.mark.parametrize("name", ["kfra"])  # KFLR's path is checked exactly above
def test_mixture_loss_trains_on_even_odd_digits(name):
  train = datasets.subset(datasets.load_mnist("train"), 256)
  x = train.inputs.reshape(256, -1)[:, ::8]
  y = mixture.even_odd(train.labels)
  model = models.MLP(features=(16, 3), activation=jnp.tanh)
  loss = mixture.mixture_of_binary_classifiers()
  tx = ESTIMATORS[name](loss)
  params = model.init(jax.random.PRNGKey(0), x[:1])
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, predict_fn=lambda q: model.apply(q, x),
                                        targets=y))
  start = float(loss.value(model.apply(params, x), y))
  for _ in range(25):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert float(loss.value(model.apply(params, x), y)) < 0.6 * start
