"""Data parallelism: each product under ``shard_map`` over 8 host devices with
``axis_name`` equals the same product on the global batch on one device.

The 8 CPU devices come from ``XLA_FLAGS`` set in ``tests/conftest.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import curvax

NUM_DEVICES = 8
AXIS = "data"
BATCH = 16  # two examples per device


def _mesh():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices (XLA_FLAGS from tests/conftest.py)")
  return jax.make_mesh((NUM_DEVICES,), (AXIS,))


MODES = ["shard_map", "shard_map/no_vma", "pmap"]


def data_parallel(fn, mode="shard_map"):
  """``fn(params, x, y)`` with the batch split over 8 devices; results replicated.

  ``mode``: ``shard_map`` (with JAX's varying-axis type checks), ``shard_map/no_vma``
  (``check_vma=False``) or ``pmap``.
  """
  mesh = _mesh()
  if mode == "pmap":
    mapped = jax.pmap(fn, axis_name=AXIS, in_axes=(None, 0, 0))
    split = lambda a: a.reshape((NUM_DEVICES, -1) + a.shape[1:])
    return lambda p, x, y: jax.tree.map(lambda r: r[0], mapped(p, split(x), split(y)))
  in_specs = (P(), P(AXIS), P(AXIS))
  mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(),
                                 check_vma=mode == "shard_map"))

  def call(*args):
    placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
              for a, spec in zip(args, in_specs)]
    return mapped(*placed)
  return call


def problem(loss_name="softmax_cross_entropy"):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(k1, (4, 6)) / 2, "b1": jnp.full((6,), 0.1),
            "w2": jax.random.normal(k2, (6, 3)) / 2}
  x = jax.random.normal(k3, (BATCH, 4))
  if loss_name == "softmax_cross_entropy":
    y = jax.random.randint(k4, (BATCH,), 0, 3)
  else:
    y = jax.random.normal(k4, (BATCH, 3))
  return params, x, y


def mlp(params, x):
  # Tagged for the Kronecker family; plain matrix products for every other solver.
  hidden = jnp.tanh(curvax.kron.dense(x, params["w1"], params["b1"]))
  return curvax.kron.dense(hidden, params["w2"])


def _products(axis_name, loss_name):
  def fn(params, x, y):
    lin = curvax.linearize(lambda p: mlp(p, x), params, loss=loss_name, targets=y,
                           axis_name=axis_name)
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape),
                     params)
    jv = lin.jvp(v)
    shifted = jax.tree.map(lambda a: a + 0.1, params)
    return {"loss": lin.loss_value, "grad": lin.grad(), "ggn": lin.ggn_vp(v),
            "fused": lin.fused_ggn_vp(v).product, "fisher": lin.fisher_vp(v),
            "hessian": lin.hessian_vp(v), "vGv": lin.output_vdot(jv, lin.output_hvp(jv)),
            "loss_at": lin.loss_at(shifted)}
  return fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "squared_error"])
def test_every_product_equals_the_global_batch_product(loss_name, mode):
  params, x, y = problem(loss_name)
  expected = jax.jit(_products(None, loss_name))(params, x, y)
  got = data_parallel(_products(AXIS, loss_name), mode)(params, x, y)
  for name in expected:
    for e, g in zip(jax.tree.leaves(expected[name]), jax.tree.leaves(got[name])):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=name)


def test_objective_averages_over_the_axis():
  params, x, y = problem()
  loss = curvax.losses.softmax_cross_entropy()
  value_fn = curvax.objective(loss, axis_name=AXIS)
  got = data_parallel(lambda p, xs, ys: value_fn(p, predict_fn=lambda q: mlp(q, xs),
                                                 targets=ys))(params, x, y)
  np.testing.assert_allclose(got, loss.value(mlp(params, x), y), rtol=1e-6)



SOLVERS = {
    "curveball": lambda axis: curvax.curveball("softmax_cross_entropy", damping=1.0,
                                               damping_period=2, axis_name=axis),
    # λ₀ = 1, not the default 0.1: on this tiny problem a smaller damping lets CG
    # amplify float32 reduction-order rounding to ~8e-5 relative in 3 steps.
    "hessian_free": lambda axis: curvax.hessian_free(
        "softmax_cross_entropy", damping=1.0, max_cg_iters=4, min_cg_iters=2,
        axis_name=axis),
    "sqn": lambda axis: curvax.sqn("softmax_cross_entropy", learning_rate=0.5, memory=3,
                                   pair_period=1, axis_name=axis),
    "lsr1": lambda axis: curvax.lsr1("softmax_cross_entropy", learning_rate=0.5, memory=3,
                                     axis_name=axis),
    "kflr": lambda axis: curvax.kflr("softmax_cross_entropy", momentum=True, tau_period=1,
                                     gamma_period=2, axis_name=axis),
    "kfra": lambda axis: curvax.kfra("softmax_cross_entropy", activations=jnp.tanh,
                                     tau_period=1, axis_name=axis),
}
STEPS = 3
# L-SR1's third step on this problem inverts a nearly singular pair (step norm ~30x the
# gradient's): float32 rounding differences between reduction orders grow past 1e-5
# there on one device alike, so its comparison stops at two steps (one pair).
NUM_STEPS = {"lsr1": 2}
# The Kronecker solvers' default momentum solves a 2×2 system that amplifies float32
# rounding of the reduction order to ~2e-5 relative after 3 steps (a wrong average over
# the axis is off by O(1)).
RTOL = {"kfac": 1e-4, "kflr": 1e-4, "kfra": 1e-4}


def _train(tx, steps=STEPS):
  def run(params, x, y):
    def step(carry, batch):
      params, state = carry
      xi, yi = batch
      updates, state = tx.update(None, state, params, predict_fn=lambda p: mlp(p, xi),
                                 targets=yi)
      return (jax.tree.map(lambda p, u: p + u, params, updates), state), None

    # A scan compiles the step once (the tests' time is mostly compilation).
    return jax.lax.scan(step, (params, tx.init(params)), (x[:steps], y[:steps]))[0]
  return run


def _batches():
  params, _, _ = problem()
  keys = jax.random.split(jax.random.PRNGKey(5), 2)
  x = jax.random.normal(keys[0], (STEPS, BATCH, 4))
  y = jax.random.randint(keys[1], (STEPS, BATCH), 0, 3)
  return params, x, y


def _assert_close(got, expected, rtol=1e-5):
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    e = np.asarray(e, np.float64)
    # Absolute slack relative to the leaf's scale: a curvature factor's small
    # off-diagonal entries carry rounding from its large ones.
    scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
    np.testing.assert_allclose(np.asarray(g, np.float64), e, rtol=rtol,
                               atol=rtol / 10 * scale)


@functools.lru_cache(maxsize=None)
def _unsharded_run(name):
  """A solver's run on the global batch on one device: the reference of both the
  ``shard_map`` and the sharded-``jit`` tests (compiled once, not three times)."""
  params, x, y = _batches()
  return jax.jit(_train(JIT_SOLVERS[name](None), NUM_STEPS.get(name, STEPS)))(params, x, y)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver_under_shard_map_equals_the_global_batch_run(name):
  params, x, y = _batches()
  steps = NUM_STEPS.get(name, STEPS)
  expected = _unsharded_run(name)
  _assert_close(_train_under_shard_map(SOLVERS[name](AXIS), steps, params, x, y), expected,
                RTOL.get(name, 1e-5))


def _train_under_shard_map(tx, steps, params, x, y):
  """``_train`` with each step's batch split over the 8 devices; results replicated."""
  mesh = _mesh()
  in_specs = (P(), P(None, AXIS), P(None, AXIS))
  mapped = jax.jit(jax.shard_map(_train(tx, steps), mesh=mesh, in_specs=in_specs,
                                 out_specs=P()))
  placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, s))
            for a, s in zip((params, x, y), in_specs)]
  return mapped(*placed)


# Under jit the program is the global one, so KFAC's sampled targets match too.
JIT_SOLVERS = {**SOLVERS, "kfac": lambda axis: curvax.kfac("softmax_cross_entropy")}


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("name", list(JIT_SOLVERS))
def test_solver_under_jit_with_a_sharded_batch_equals_the_unsharded_run(name, axis_type):
  params, x, y = _batches()
  run = jax.jit(_train(JIT_SOLVERS[name](None), NUM_STEPS.get(name, STEPS)))
  expected = _unsharded_run(name)
  _mesh()
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  place = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
  with jax.set_mesh(mesh):
    got = run(place(params, P()), place(x, P(None, AXIS)), place(y, P(None, AXIS)))
  _assert_close(got, expected, RTOL.get(name, 1e-5))


def test_linearization_with_another_axis_is_refused():
  params, x, y = problem()
  lin = curvax.linearize(lambda p: mlp(p, x), params, loss="softmax_cross_entropy",
                         targets=y)
  tx = curvax.curveball("softmax_cross_entropy", axis_name=AXIS)
  with pytest.raises(ValueError, match="axis_name"):
    tx.update(None, tx.init(params), params, linearization=lin)


def test_kfac_under_shard_map_averages_its_factors_over_the_axis():
  """KFAC's sampled targets differ per device (the key is folded with the device index),
  so only its deterministic parts can match the global batch: the loss, the gradient
  inside the first step's input factors ``Q̃`` and the replicated parameters."""
  params, x, y = _batches()
  make = lambda axis: curvax.kfac("softmax_cross_entropy", axis_name=axis)
  _, expected = jax.jit(_train(make(None), 1))(params, x, y)
  got_params, got = _train_under_shard_map(make(AXIS), 1, params, x, y)
  _assert_close((got.factors.q, got.loss), (expected.factors.q, expected.loss))
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(got_params))
