"""Compile time of one step: every curvax solver with its defaults, Adam and kfac-jax.

    make bench-compile                       # in .venv-kfac-jax (builds it), all rows
    python -m benchmarks.compile_time [--repeats 3] [--only kfac,adam]   # any env

The paper-scale MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (sigmoid, linear
code, Bernoulli BCE; as in ``time_to_loss`` and ``kfac_vs_kfac_jax``), batch 1000. Each
optimiser's jitted training step (``training.make_step``: the update and
``optax.apply_updates``; for kfac-jax its own staged ``Optimizer._step`` as
``Optimizer.step`` calls it, configured as in ``kfac_vs_kfac_jax``) is traced, lowered and
compiled for abstract inputs of the batch's shape, each stage timed apart:

* ``trace``: Python tracing to a jaxpr (the solver's own Python, Flax, layer capture);
* ``lower``: jaxpr to StableHLO;
* ``compile``: XLA's optimisation and code generation.

Every repeat builds the optimiser and step function afresh after ``jax.clear_caches()``,
with the persistent compilation cache off, and the median of ``--repeats`` is reported
per stage (``total`` is the median of the sums). Op counts (StableHLO before XLA, HLO
after) show how much program each stage handles.

kfac-jax matches the layers of the network when its init is first traced (its curvature
estimator's ``finalize``: a trace of the loss and a graph pattern search) before its step
can be traced; the time to trace its init is the ``setup`` column (paid once per
optimiser, like a trace; curvax has none: its layer capture is in the step's trace). Its step is specialised on whether
the damping is adapted at that step (every 5th), so a run compiles two programs: the row
``kfac_jax (damping step)`` is the second; curvax compiles one program per solver (its
periodic work is inside ``lax.cond``).

The kfac-jax rows run only where it is installed (``.venv-kfac-jax``, jax 0.9.0, where
curvax's KFRA does not run); ``make bench-compile`` therefore measures every curvax solver
and Adam in the main environment, then KFAC, Adam and kfac-jax in the kfac-jax one (same
jax for the KFAC/kfac-jax ratio), ``--append``-ing that run. A candidate that fails
records its error. Writes ``benchmarks/results/compile_time.json`` (one entry per
environment) and prints a markdown table per environment.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import curvax
from benchmarks import kfac_vs_kfac_jax
from curvax import kron
from curvax.problems import models, training

RESULTS = pathlib.Path(__file__).parent / "results"
BATCH = 1000
SOLVERS = {
    "kfac": curvax.kfac, "kflr": curvax.kflr, "kfra": curvax.kfra,
    "curveball": curvax.curveball, "hessian_free": curvax.hessian_free,
    "sqn": curvax.sqn, "lsr1": curvax.lsr1,
}
GOAL = ("kfac", "kfac_jax", 1.0)  # KFAC's step compiles no slower than kfac-jax's


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _problem():
  model = models.Autoencoder()
  loss = curvax.losses.sigmoid_binary_cross_entropy()
  x = jax.ShapeDtypeStruct((BATCH, 784), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784))))
  return model, loss, params, x


def curvax_candidate(name):
  """``() -> (jitted step, abstract args, setup seconds)`` for a fresh curvax solver."""
  def build():
    model, loss, params, x = _problem()
    # KFRA's one structural argument: the chain's elementwise functions.
    extra = {"activations": kron.chain_activations(model)} if name == "kfra" else {}
    tx = SOLVERS[name](loss, **extra)
    step = training.make_step(model, tx, loss, second_order=True)
    return step, (params, jax.eval_shape(tx.init, params), x, x), 0.0
  return build


def adam_candidate():
  def build():
    model, loss, params, x = _problem()
    tx = optax.adam(1e-3)
    step = training.make_step(model, tx, loss, second_order=False)
    return step, (params, jax.eval_shape(tx.init, params), x, x), 0.0
  return build


def kfac_jax_candidate(*, damping_step: bool, initial_damping: float = 1e-3):
  """kfac-jax's step exactly as ``Optimizer.step`` stages it (``static_argnums`` and
  ``donate_argnums`` of its ``utils.staged`` decorator, traced in its staging context)."""
  import kfac_jax  # noqa: PLC0415  (only in the kfac-jax environment)

  def build():
    model, loss, params, x = _problem()
    optimizer = kfac_vs_kfac_jax.kfac_jax_optimizer(model, loss,
                                                    initial_damping=initial_damping)
    concrete = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))
    batch, key = jnp.zeros(x.shape, x.dtype), jax.random.PRNGKey(0)
    start = time.perf_counter()
    # Tracing its init matches the layers (its estimator's finalize), as init's first call.
    state = jax.eval_shape(optimizer._init, concrete, key, batch)  # noqa: SLF001
    setup = time.perf_counter() - start
    raw_step = kfac_jax.Optimizer._step.__wrapped__  # noqa: SLF001
    jitted = jax.jit(raw_step, static_argnums=(0, 9, 10), donate_argnums=(1, 2, 5))

    class Staged:  # trace in kfac-jax's staging context, as its own decorator does
      def trace(self, *args):
        with optimizer.staging_context():
          return jitted.trace(optimizer, *args)

    args = (params, state, _abstract(key), x, None, None, None, None, True, damping_step)
    return Staged(), args, setup
  return build


def _count_ops(text: str) -> int:
  return sum(1 for line in text.splitlines() if re.match(r"\s*(ROOT )?%?[\w.#-]+ = ", line))


def measure(build, repeats: int) -> dict:
  """Median seconds of each stage over ``repeats`` fresh builds, and the op counts."""
  try:
    return _measure(build, repeats)
  except Exception as error:  # noqa: BLE001  (e.g. a solver unsupported by this jax)
    return {"error": f"{type(error).__name__}: {error}".splitlines()[0]}


def _measure(build, repeats: int) -> dict:
  samples = {"setup": [], "trace": [], "lower": [], "compile": [], "total": []}
  for _ in range(repeats):
    jax.clear_caches()
    step, args, setup = build()
    start = time.perf_counter()
    traced = step.trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    stages = {"setup": setup, "trace": traced_at - start, "lower": lowered_at - traced_at,
              "compile": done - lowered_at}
    stages["total"] = sum(stages.values())
    for stage, seconds in stages.items():
      samples[stage].append(seconds)
  row = {f"{stage}_s": round(statistics.median(v), 3) for stage, v in samples.items()}
  row["stablehlo_ops"] = _count_ops(lowered.as_text())
  row["hlo_ops"] = _count_ops(compiled.as_text())
  row["samples_total_s"] = [round(v, 3) for v in samples["total"]]
  return row


def candidates(only=None) -> dict:
  found = {name: curvax_candidate(name) for name in SOLVERS}
  found["adam"] = adam_candidate()
  if kfac_vs_kfac_jax.kfac_jax is not None:
    found["kfac_jax"] = kfac_jax_candidate(damping_step=False)
    found["kfac_jax (damping step)"] = kfac_jax_candidate(damping_step=True)
  return {k: v for k, v in found.items() if not only or k.split(" ")[0] in only}


def markdown(rows: dict) -> str:
  adam = rows.get("adam", {}).get("total_s")
  kfac_jax = rows.get("kfac_jax", {}).get("total_s")
  ratio = lambda total, base: f"{total / base:.1f}" if base else "–"
  lines = ["| optimiser | setup s | trace s | lower s | XLA compile s | total s | × Adam "
           "| × kfac-jax | StableHLO ops | HLO ops |", "|---|" + "---|" * 9]
  for name, row in rows.items():
    if "error" in row:
      lines.append(f"| {name} | {row['error']} |" + " |" * 8)
      continue
    lines.append(f"| {name} | {row['setup_s']:.2f} | {row['trace_s']:.2f} | "
                 f"{row['lower_s']:.2f} | {row['compile_s']:.2f} | {row['total_s']:.2f} | "
                 f"{ratio(row['total_s'], adam)} | {ratio(row['total_s'], kfac_jax)} | "
                 f"{row['stablehlo_ops']} | {row['hlo_ops']} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3, help="fresh compiles per optimiser")
  parser.add_argument("--only", default="",
                      help="comma-separated optimisers (e.g. kfac,kfac_jax,adam)")
  parser.add_argument("--output", default=str(RESULTS / "compile_time.json"))
  parser.add_argument("--append", action="store_true",
                      help="add this environment's run to --output instead of replacing it")
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)  # every compile is a real one
  rows = {}
  for name, build in candidates(set(filter(None, args.only.split(",")))).items():
    rows[name] = measure(build, args.repeats)
    print(json.dumps({"optimiser": name, **rows[name]}), flush=True)
  summary = {}
  mine, theirs, goal = GOAL
  if "total_s" in rows.get(mine, {}) and "total_s" in rows.get(theirs, {}):
    ratio = rows[mine]["total_s"] / rows[theirs]["total_s"]
    summary = {f"{mine}/{theirs}": round(ratio, 2), "goal": goal, "met": ratio <= goal}
  run = {"problem": "autoencoder 784-1000-500-250-30-250-500-1000-784", "batch": BATCH,
         "repeats": args.repeats, "jax": jax.__version__,
         "kfac_jax": getattr(kfac_vs_kfac_jax.kfac_jax, "__version__", None),
         "backend": jax.default_backend(),
         "machine": platform.processor() or platform.machine(),
         "rows": rows, "summary": summary}
  output = pathlib.Path(args.output)
  runs = (json.loads(output.read_text())["runs"] if args.append and output.exists()
          else [])
  output.parent.mkdir(exist_ok=True)
  output.write_text(json.dumps({"runs": runs + [run]}, indent=1) + "\n")
  print(f"jax {run['jax']}" + (f", kfac-jax {run['kfac_jax']}" if run["kfac_jax"] else ""))
  print(markdown(rows))
  if summary:
    print(json.dumps(summary))


if __name__ == "__main__":
  main()
