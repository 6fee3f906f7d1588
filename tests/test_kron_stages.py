"""The stages of one Kronecker-factored step (curvax.kron.stages), each on its own,
against dense references: the GGN from jax.jacobian, the objective from optax's loss."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from curvax import damping as damping_lib
from curvax import kron, losses
from curvax.kfac import _settings as validated, kronecker_factored
from curvax.kron import stages
from tests import dense_reference as ref

GAMMA, TAU = 1e-2, 1e-1


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def _settings(**overrides) -> stages.Settings:
  defaults = {p.name: p.default for p in inspect.signature(
      kronecker_factored).parameters.values()
              if p.name not in ("loss", "estimator", "name", "inverse")}
  return validated("test", **{**defaults, **overrides})


def _estimator(cap, key):
  return kron.kflr_factors(cap, key, fallback_diagonal=True, weight_sharing="expand")


class _Setup:
  """The tiny tanh MLP, tagged for the capture, and the stages' inputs at count 0."""

  def __init__(self, count=0, **overrides):
    mlp = ref.tiny_mlp(batch=5)
    self.params, self.y, x = mlp.params, mlp.y, mlp.x
    self.plain = mlp.predict_fn()
    self.predict = lambda p: kron.dense(jnp.tanh(kron.dense(x, p["w1"], p["b1"])),
                                        p["w2"], p["b2"])
    self.settings = _settings(**overrides)
    factors, self.stored = stages.CHOLESKY.init(self.params)
    self.ctx = stages.make_context(self.settings, losses.softmax_cross_entropy(), factors,
                                   jnp.asarray(count, jnp.int32), None, self.params,
                                   predict_fn=self.predict, targets=self.y,
                                   linearization=None)
    self.initial = factors
    self.factors, self.accept = stages.estimate_factors(self.ctx, self.settings,
                                                        _estimator, factors)
    self.ggn, self.grad = ref.dense_ggn(self.plain, self.params, self.y)

  def direction(self, gamma):
    rep = stages.CHOLESKY.refresh(self.factors, self.stored, self.ctx.capture,
                                  jnp.asarray(gamma))
    return rep, ref.flat(stages.CHOLESKY.precondition(
        self.ctx.capture, self.ctx.grad, self.factors, rep, jnp.asarray(gamma)))

  def model_value(self, step):
    return self.grad @ step + 0.5 * (step @ self.ggn @ step + TAU * step @ step)


def test_context_gradient_is_the_dense_gradient():
  s = _Setup()
  np.testing.assert_allclose(ref.flat(s.ctx.grad), s.grad, rtol=1e-10, atol=1e-12)


def test_candidate_is_the_closed_form_step_size():
  """α* = −δ̃ᵀ∇f / (δ̃ᵀGδ̃ + τ‖δ̃‖²) (eq. 40–41) with the dense GGN; f̂(α*δ̃)."""
  s = _Setup(momentum=False)
  rep, d = s.direction(GAMMA)
  got = stages.candidate(s.ctx, s.settings, stages.CHOLESKY, s.factors, rep,
                         jnp.asarray(GAMMA), None, jnp.asarray(TAU))
  alpha = -(d @ s.grad) / (d @ s.ggn @ d + TAU * d @ d)
  np.testing.assert_allclose(got.alpha, alpha, rtol=1e-9)
  np.testing.assert_allclose(ref.flat(got.step), alpha * d, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(got.value, s.model_value(alpha * d), rtol=1e-9)
  assert float(got.mu) == 0.0


def test_candidate_with_momentum_minimises_the_model_over_both_directions():
  s = _Setup()
  rep, d = s.direction(GAMMA)
  velocity = jax.tree.map(lambda p: 0.1 * jnp.cos(p), s.params)
  v = ref.flat(velocity)
  got = stages.candidate(s.ctx, s.settings._replace(momentum_bounds=None), stages.CHOLESKY,
                         s.factors, rep, jnp.asarray(GAMMA),
                         stages.momentum_terms(s.ctx, velocity), jnp.asarray(TAU))
  basis = np.stack([d, v], axis=1)
  gram = basis.T @ (s.ggn + TAU * np.eye(len(d))) @ basis
  alpha, mu = np.linalg.solve(gram, -basis.T @ s.grad)
  np.testing.assert_allclose([got.alpha, got.mu], [alpha, mu], rtol=1e-8)
  np.testing.assert_allclose(ref.flat(got.step), alpha * d + mu * v, rtol=1e-8, atol=1e-12)


def test_choose_gamma_keeps_the_candidate_with_the_lowest_model_value():
  """App. C.3.2: on a rule step (count 0) each of {ω_γγ, γ, γ/ω_γ} with fresh inverses."""
  s = _Setup(momentum=False)
  omega = 0.5
  settings = s.settings._replace(gamma_factor=omega)
  chosen = stages.choose_gamma(s.ctx, settings, stages.CHOLESKY, s.factors, s.stored,
                               jnp.asarray(GAMMA), None, jnp.asarray(TAU))
  values = {}
  for gamma in np.asarray(damping_lib.gamma_candidates(jnp.asarray(GAMMA), omega)):
    _, d = s.direction(gamma)
    alpha = -(d @ s.grad) / (d @ s.ggn @ d + TAU * d @ d)
    values[float(gamma)] = (s.model_value(alpha * d), alpha * d)
  best = min(values, key=lambda g: values[g][0])
  assert len(values) == 3
  np.testing.assert_allclose(chosen.gamma, best, rtol=1e-12)
  np.testing.assert_allclose(ref.flat(chosen.step), values[best][1], rtol=1e-8, atol=1e-12)


def test_choose_gamma_off_the_rule_uses_the_stored_representation():
  """Count 1, inverse_period 5: no refresh — the identity inverses of init give δ̃ = ∇f
  (plus the fallback-free blocks: every leaf here is in a Kronecker block)."""
  s = _Setup(count=1, momentum=False)
  chosen = stages.choose_gamma(s.ctx, s.settings, stages.CHOLESKY, s.factors, s.stored,
                               jnp.asarray(GAMMA), None, jnp.asarray(TAU))
  g = s.grad
  alpha = -(g @ g) / (g @ s.ggn @ g + TAU * g @ g)
  np.testing.assert_allclose(ref.flat(chosen.step), alpha * g, rtol=1e-8, atol=1e-12)
  assert float(chosen.gamma) == GAMMA


def test_tau_rule_ratio_and_update():
  """ρ = (f(θ+δ) − f(θ)) / (∇fᵀδ + ½δᵀ(G + τI)δ) (eq. 42) and the LM rule on τ."""
  s = _Setup(momentum=False, tau_period=1, tau_factor=0.5)
  _, d = s.direction(GAMMA)
  for scale in (0.5, 8.0):  # a good step (ρ > 0.75) and an overshoot
    step_flat = scale * -(d @ s.grad) / (d @ s.ggn @ d + TAU * d @ d) * d
    step = ravel_pytree(s.params)[1](jnp.asarray(step_flat))
    image = s.ctx.capture.jvp(step)
    tau, ratio, taken = stages.tau_rule(s.ctx, s.settings, jnp.float32(np.nan), step, image,
                                        jnp.asarray(TAU), jnp.asarray(TAU))
    new = jax.tree.map(lambda p, u: p + u, s.params, step)
    actual = ref.loss_at(s.plain, new, s.y) - ref.loss_at(s.plain, s.params, s.y)
    expected = actual / s.model_value(step_flat)
    np.testing.assert_allclose(ratio, expected, rtol=1e-6)
    assert bool(taken)
    np.testing.assert_allclose(tau, TAU * 0.5 if expected > 0.75 else TAU / 0.5, rtol=1e-12)


def test_tau_rule_stops_at_min_tau_not_min_damping():
  """A good step shrinks τ by ω_τ, but not below ``min_tau`` (the floor on τ alone; γ's
  bound stays ``min_damping``); with ``min_tau=0`` the same step shrinks it freely."""
  for floor, expected in ((0.08, 0.08), (0.0, TAU * 0.5)):
    s = _Setup(momentum=False, tau_period=1, tau_factor=0.5, min_tau=floor)
    _, d = s.direction(GAMMA)
    step_flat = 0.5 * -(d @ s.grad) / (d @ s.ggn @ d + TAU * d @ d) * d
    step = ravel_pytree(s.params)[1](jnp.asarray(step_flat))
    tau, ratio, _ = stages.tau_rule(s.ctx, s.settings, jnp.float32(np.nan), step,
                                    s.ctx.capture.jvp(step), jnp.asarray(TAU),
                                    jnp.asarray(TAU))
    assert float(ratio) > 0.75
    np.testing.assert_allclose(tau, expected, rtol=1e-12)


def test_estimate_factors_between_periods_keeps_the_averages():
  s = _Setup(count=1, factor_period=2)
  for old, new in zip(jax.tree.leaves(s.initial), jax.tree.leaves(s.factors)):
    np.testing.assert_array_equal(old, new)
  assert bool(s.accept)
  fresh = _Setup(count=2, factor_period=2)
  assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(fresh.factors.g))

