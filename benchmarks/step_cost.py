"""Cost of one optimiser step relative to an optax SGD step on the same model and batch.

    python -m benchmarks.step_cost

The SGD step is the one a user writes with optax alone (``jax.value_and_grad`` of
``optax.softmax_cross_entropy_with_integer_labels(...).mean()`` + ``optax.sgd`` +
``optax.apply_updates``, jitted: ``curvax.problems.training.first_order_update``).
Each timed unit is ``CYCLE`` consecutive steps, so the λ rule's extra forward pass (every
5th CurveBall step) is counted at its true frequency. Prints one JSON line per (model,
optimiser) with the time ratio, the passes the step makes over the network, and the
compiled step's temporary memory (XLA memory analysis) as a ratio to SGD's.
"""

from __future__ import annotations

import argparse
import json

import jax
import optax

import curvax
from benchmarks.timing import median_times
from curvax.problems import models, training

CYCLE = 5

# Passes over the network per step, for the output (what each product costs).
PASSES = {
    "sgd": ["forward", "backward"],
    "curveball": ["forward (linearize)", "J z", "Jᵀ(H_L J z + ∇L)", "J Δz (eq. 19)",
                  "forward at w+αz (λ rule, 1 step in 5)"],
    "curveball/fixed": ["forward (linearize)", "J z", "Jᵀ(H_L J z + ∇L)",
                        "forward + J Δz at w, forward at w+αz (λ rule, 1 step in 5)"],
    "curveball/fixed, no λ rule": ["forward (linearize)", "J z", "Jᵀ(H_L J z + ∇L)"],
}


def _problem(name, key):
  kx, ky, kp = jax.random.split(key, 3)
  if name == "mlp":
    model, x = models.MLP(features=(1000, 500, 250, 10)), jax.random.uniform(kx, (256, 784))
  else:
    model, x = models.BasicCNN(num_classes=10), jax.random.uniform(kx, (128, 28, 28, 1))
  y = jax.random.randint(ky, (x.shape[0],), 0, 10)
  return model, model.init(kp, x), x, y


def _steps(model, x, y, loss):
  """Jitted single steps, each ``(params, state) -> (params, state)``."""
  predict = lambda p: model.apply(p, x)
  sgd = optax.sgd(1e-3)
  objective = training.optax_objective(loss)

  def sgd_step(params, state):
    return training.first_order_update(sgd, objective, params, state, predict, y)[:2]

  def solver_step(tx):
    def step(params, state):
      updates, state = tx.update(None, state, params, predict_fn=predict, targets=y)
      return optax.apply_updates(params, updates), state
    return tx, step

  return {
      "sgd": (sgd, sgd_step),
      "curveball": solver_step(curvax.curveball(loss)),
      "curveball/fixed": solver_step(curvax.curveball(loss, rho=0.9, beta=0.01)),
      "curveball/fixed, no λ rule": solver_step(
          curvax.curveball(loss, rho=0.9, beta=0.01, damping_period=0)),
  }


def _temp_bytes(step, params, state):
  analysis = jax.jit(step).lower(params, state).compile().memory_analysis()
  return getattr(analysis, "temp_size_in_bytes", None) if analysis else None


def measure(model_name: str, repeats: int):
  loss = curvax.losses.softmax_cross_entropy()
  model, params, x, y = _problem(model_name, jax.random.PRNGKey(0))
  runs, memory = {}, {}
  for name, (tx, step) in _steps(model, x, y, loss).items():
    jitted, state = jax.jit(step), tx.init(params)
    memory[name] = _temp_bytes(step, params, state)

    def cycle(jitted=jitted, state=state):
      p, s = params, state
      for _ in range(CYCLE):
        p, s = jitted(p, s)
      return p
    runs[name] = cycle
  times = median_times(runs, repeats=repeats)
  for name in runs:
    if name == "sgd":
      continue
    row = {"model": model_name, "name": name, "ratio": round(times[name] / times["sgd"], 3),
           "passes": PASSES[name], "backend": jax.default_backend()}
    if memory[name] and memory["sgd"]:
      row["temp_memory_ratio"] = round(memory[name] / memory["sgd"], 3)
    print(json.dumps(row, ensure_ascii=False), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  for model_name in args.models.split(","):
    measure(model_name, args.repeats)


if __name__ == "__main__":
  main()
