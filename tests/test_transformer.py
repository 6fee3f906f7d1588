"""Every solver trains a small causal transformer (embeddings, attention, LayerNorm) in a
jitted step; KFLR states and bounds its cost in columns, KFRA refuses the model."""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import curvax
from curvax import kron
from curvax.problems import models

VOCAB, POSITIONS = 7, 6
MODEL = models.Transformer(vocab_size=VOCAB, width=8, num_heads=2, num_blocks=1,
                           context=POSITIONS)
LOSS = curvax.losses.softmax_cross_entropy()

SOLVERS = {
    "curveball": lambda: curvax.curveball(LOSS),
    "hessian_free": lambda: curvax.hessian_free(LOSS),
    "sqn": lambda: curvax.sqn(LOSS, learning_rate=0.3, pair_period=2),
    "lsr1": lambda: curvax.lsr1(LOSS, learning_rate=0.3, pair_period=2),
    # No γ rule (three inverse sets to compile); reduce on one, expand on the other.
    "kfac": lambda: curvax.kfac(LOSS, gamma_period=0, weight_sharing="reduce"),
    "kflr": lambda: curvax.kflr(LOSS, gamma_period=0),
}


def _batch():
  # Tokens that continue a pattern (t_{i+1} = t_i + 2 mod V): learnable in a few steps.
  start = jax.random.randint(jax.random.PRNGKey(0), (4, 1), 0, VOCAB)
  sequence = (start + 2 * jnp.arange(POSITIONS + 1)) % VOCAB
  return sequence[:, :-1], sequence[:, 1:]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_trains_a_causal_transformer_in_a_jitted_step(name):
  tokens, targets = _batch()
  params = MODEL.init(jax.random.PRNGKey(1), tokens)
  tx = SOLVERS[name]()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(None, state, params,
                               predict_fn=lambda p: MODEL.apply(p, tokens), targets=targets)
    return optax.apply_updates(params, updates), state

  loss = lambda p: LOSS.value(MODEL.apply(p, tokens), targets)
  first = float(loss(params))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(4):
      params, state = step(params, state)
  if name.startswith("kf"):
    # Every parameter has a block (the LayerNorms full ones): no fallback warning.
    assert not [w for w in caught if "fallback curvature" in str(w.message)]
  final = float(loss(params))
  assert final < 0.85 * first, (first, final)


def test_kflr_bounds_its_columns_and_kfra_refuses_a_transformer():
  tokens, targets = _batch()
  params = MODEL.init(jax.random.PRNGKey(1), tokens)
  predict = lambda p: MODEL.apply(p, tokens)
  tx = curvax.kflr(LOSS, max_columns=VOCAB * POSITIONS - 1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ValueError, match=f"K = {VOCAB * POSITIONS} output columns"):
      tx.update(None, tx.init(params), params, predict_fn=predict, targets=targets)
    tx = curvax.kfra(LOSS, activations=jax.nn.gelu)
    with pytest.raises(ValueError, match="KFRA's recursion .* needs a chain"):
      tx.update(None, tx.init(params), params, predict_fn=predict, targets=targets)
  with pytest.raises(ValueError, match="weight_sharing must be one of"):
    curvax.kfac(LOSS, weight_sharing="mean")
