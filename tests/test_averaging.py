"""Polyak averaging: the recurrence of kfra_kflr.md eq. 44–45 against a float64
recurrence by hand, in low precision and with schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax


def _reference(params_seq, cap):
  """``θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t``, ``β_t = min(cap(t − 1), 1 − 1/t)``, float64."""
  average = np.asarray(params_seq[0], np.float64)
  for t, theta in enumerate(params_seq[1:], start=1):
    beta = min(cap(t - 1), 1 - 1 / t)
    average = beta * average + (1 - beta) * np.asarray(theta, np.float64)
  return average


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_average_keeps_small_increments(dtype):
  """Parameters move by 2 ulps for 20 steps, then stay: the average should close in on
  them, but once ``(1 − β_t)(θ_t − θ̂_{t−1})`` is below half an ulp of ``θ̂`` (a gap of
  ~10 ulps) an average kept in the parameters' dtype stops moving."""
  ulp = float(jnp.finfo(dtype).eps)
  tx = curvax.polyak()
  params = {"w": jnp.ones((3,), dtype)}
  state, seen = tx.init(params), [params["w"]]
  step = jax.jit(tx.update)
  for t in range(80):
    updates = {"w": jnp.full((3,), 2 * ulp if t < 20 else 0.0, dtype)}
    _, state = step(updates, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(params["w"])
  expected = _reference(seen, lambda t: 0.95)
  got = curvax.averaged_params(state)["w"]
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=0, atol=ulp)


def test_max_decay_as_schedule_and_under_inject_hyperparams():
  with jax.enable_x64(True):
    cap = lambda count: 0.3 + 0.05 * count
    thetas = [jnp.asarray([float(t) ** 1.5, -t]) for t in range(8)]

    def run(tx):
      state = tx.init({"w": thetas[0]})
      step = jax.jit(tx.update)
      for previous, theta in zip(thetas, thetas[1:]):
        _, state = step({"w": theta - previous}, state, {"w": previous})
      return np.asarray(curvax.averaged_params(state)["w"])

    np.testing.assert_allclose(run(curvax.polyak(cap)), _reference(thetas, cap),
                               rtol=1e-12)
    injected = optax.inject_hyperparams(curvax.polyak)(max_decay=np.float32(0.4))
    np.testing.assert_allclose(run(injected), _reference(thetas, lambda t: 0.4),
                               rtol=1e-6)


def test_a_step_donating_params_and_state_keeps_the_recurrence():
  """float32 parameters need no widening; the average must still be its own buffer, or a
  step donating params and state together is refused ("donate the same buffer twice")."""
  tx = curvax.polyak()

  @jax.jit
  def plain(params, state, shift):
    updates = jnp.full_like(params, shift)
    return params + updates, tx.update(updates, state, params)[1]

  donating = jax.jit(plain, donate_argnums=(0, 1))
  params = jnp.arange(3.0, dtype=jnp.float32)
  state, seen = tx.init(params), [np.asarray(params)]
  for t in range(4):
    params, state = donating(params, state, jnp.float32(t + 1))
    seen.append(np.asarray(params))
  np.testing.assert_allclose(state.average, _reference(seen, lambda t: 0.95), rtol=1e-6)
