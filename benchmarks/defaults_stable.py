"""Every solver with its defaults on every shipped problem: finite, and below its start.

    python -m benchmarks.defaults_stable [--solvers curveball,lsr1] [--problems cnn]
                                         [--steps 20] [--scale 1.0]

Problems: the autoencoder, MLP and CNN of :mod:`curvax.problems.suite`, the mixture
classifier (:func:`mixture_problem`: kfra_kflr.md §5.2's non-exponential-family loss on
MNIST even/odd) and the small causal transformer of :mod:`benchmarks.transformer_lm`
(``problem(small=True)``). Each solver is built with the loss alone (KFRA is told the
network's elementwise function, which its recursion needs; it refuses the CNN and the
transformer), trains ``--steps`` steps from the shared initialisation on the shared
batch stream, and a row records the probe (validation, for the transformer) loss at the
start and the end, its curve, and whether it passed: every loss finite and the last
below the first. Rows also carry ``num_skipped`` and ``num_rolled_back`` from the
solver state. Writes ``benchmarks/results/defaults_stable.json`` (rows merged into an
earlier file, so a run over one solver or problem updates just those) and prints the
markdown table of ``docs/guides/reliability.md``. ``--scale`` < 1 shrinks the MNIST problems' data and
batches (``tests/test_defaults_stable.py`` runs tiny versions).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import time_to_loss, transformer_lm
import curvax
from curvax import losses
from curvax.problems import datasets, mixture, models, suite, text

RESULTS = time_to_loss.RESULTS / "defaults_stable.json"
SOLVERS = ("kfac", "kflr", "kfra", "ekfac", "curveball", "hessian_free", "sqn", "lsr1")
PROBLEMS = ("autoencoder", "mlp", "cnn", "mixture", "transformer")
BUILDERS = {**time_to_loss.SOLVERS, "ekfac": curvax.ekfac}


class TinyCNN(nn.Module):
  """A small ReLU CNN (3×3 convolutions with 8 and 16 channels, 2×2 max-pooling, a
  linear read-out) for the tiny problems: where L-SR1's model step without its trust
  region diverged fastest (``docs/api/lsr1.md``)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for channels in (8, 16):
      x = nn.max_pool(nn.relu(nn.Conv(channels, (3, 3))(x)), (2, 2), strides=(2, 2))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def problem(name: str, *, scale: float = 1.0, tiny: bool = False):
  """A problem of the module docstring; ``tiny``: narrow models on 256 images (the test)."""
  if name == "transformer":
    if not tiny:
      return transformer_lm.problem(small=True)
    corpus = text.load_stdlib()
    model = models.Transformer(vocab_size=text.VOCAB_SIZE, width=16, num_heads=2,
                               num_blocks=1, context=16)
    validation = text.windows(corpus.validation, jax.random.PRNGKey(12345), 16, 16)
    return transformer_lm.Problem(model, corpus, 8, validation)
  if name == "mixture":
    return mixture_problem(scale=scale, tiny=tiny)
  if not tiny:
    return suite.problem(name, scale=scale)
  flat = name != "cnn"
  data = datasets.subset(datasets.load_mnist("train", flatten=flat), 256)
  probe = datasets.subset(data, 128)
  if name == "autoencoder":
    return suite.Problem(models.Autoencoder(hidden=(32, 8)),
                         losses.sigmoid_binary_cross_entropy(), data, probe, 64, True,
                         [jax.nn.sigmoid, None, jax.nn.sigmoid])
  model = models.MLP(features=(32, 10)) if name == "mlp" else TinyCNN()
  return suite.Problem(model, losses.softmax_cross_entropy(), data, probe, 32, False,
                       jnp.tanh if name == "mlp" else jax.nn.relu)


def mixture_problem(*, scale: float = 1.0, tiny: bool = False) -> suite.Problem:
  """The mixture of two binary classifiers (kfra_kflr.md §5.2, eq. 27) on MNIST even/odd:
  the MLP problem's tanh network with 3 outputs, 10 000 images, batch 128."""
  size = lambda n: max(int(n * scale), 1)
  data = datasets.subset(datasets.load_mnist("train"), 256 if tiny else size(10000))
  data = data._replace(labels=mixture.even_odd(data.labels), num_classes=2)
  features = (32, 3) if tiny else (1000, 500, 250, 3)
  return suite.Problem(models.MLP(features=features),
                       mixture.mixture_of_binary_classifiers(), data,
                       datasets.subset(data, 128 if tiny else size(5000)),
                       32 if tiny else size(128), False, jnp.tanh)


def build(solver: str, prob) -> object:
  """The solver with its defaults (KFRA: and the network's activations)."""
  loss = prob.loss if isinstance(prob, suite.Problem) else transformer_lm.LOSS
  extra = {}
  if solver == "kfra":
    extra["activations"] = (prob.activation if isinstance(prob, suite.Problem)
                            else jax.nn.gelu)  # refused: the transformer is no chain
  return BUILDERS[solver](loss, **extra)


def run_row(solver: str, name: str, steps: int, *, scale: float = 1.0,
            tiny: bool = False) -> dict:
  """One solver on one problem for ``steps`` steps; the row of the JSON."""
  prob = problem(name, scale=scale, tiny=tiny)
  start = time.perf_counter()
  try:
    tx = build(solver, prob)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # fallback-curvature warnings (LayerNorm)
      if name == "transformer":
        record = transformer_lm.run_one(prob, tx, second_order=True, max_steps=steps,
                                        seed=0, eval_every=np.inf)
        curve, state = record["validation_loss"], None
      else:
        run = suite.Run(prob, tx, second_order=True)
        evaluations = min(steps, 5)
        for k in range(1, evaluations + 1):
          run.advance(steps=round(k * steps / evaluations))
        curve, state = run.record["loss"], run.state
  except ValueError as error:  # KFRA refuses networks that are not Dense chains
    return {"refused": str(error).splitlines()[0][:200]}
  curve = [float(v) for v in curve]
  row = {"start": curve[0], "final": curve[-1], "curve": curve, "steps": steps,
         "seconds": round(time.perf_counter() - start, 1),
         "passed": bool(np.all(np.isfinite(curve)) and curve[-1] < curve[0])}
  if state is not None:
    row.update(num_skipped=int(state.num_skipped),
               num_rolled_back=int(getattr(state, "num_rolled_back", 0)))
  return row


def markdown(evidence: dict) -> str:
  """The docs' table (docs/guides/reliability.md): start → final loss per solver and problem, ✗ where it failed."""
  problems = [p for p in PROBLEMS if any(p in rows for rows in evidence["rows"].values())]
  lines = ["| solver | " + " | ".join(problems) + " |",
           "|---|" + "---|" * len(problems)]
  for solver in SOLVERS:
    rows = evidence["rows"].get(solver)
    if not rows:
      continue
    cells = []
    for name in problems:
      row = rows.get(name)
      if row is None:
        cells.append("")
      elif "refused" in row:
        cells.append("refuses")
      else:
        mark = "" if row["passed"] else " ✗"
        cells.append(f"{row['start']:.3g} → {row['final']:.3g}{mark}")
    lines.append(f"| {solver} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--solvers", default=",".join(SOLVERS))
  parser.add_argument("--problems", default=",".join(PROBLEMS))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--output", default=str(RESULTS))
  args = parser.parse_args(argv)
  path = pathlib.Path(args.output)
  evidence = (json.loads(path.read_text()) if path.exists()
              else {"command": "python -m benchmarks.defaults_stable", "rows": {}})
  for solver in args.solvers.split(","):
    for name in args.problems.split(","):
      row = run_row(solver, name, args.steps, scale=args.scale)
      row["scale"] = args.scale
      evidence["rows"].setdefault(solver, {})[name] = row
      print(json.dumps({"solver": solver, "problem": name,
                        **{k: v for k, v in row.items() if k != "curve"}},
                       ensure_ascii=False), flush=True)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(evidence, indent=1, ensure_ascii=False))
  print(markdown(evidence))


if __name__ == "__main__":
  main()
