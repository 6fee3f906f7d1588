"""Soak: every solver for many steps on a tiny problem — no NaN, no retrace, flat cost.

    python -m benchmarks.soak [--steps 20000] [--only kfac,sqn] [--window 1000]

A 6-16-4 tanh MLP (tagged layers, so the Kronecker family sees them) on a teacher's
labels (10 % replaced by random ones), batch 32, streamed from a fixed pool of 64 batches (the data cost nothing and
cannot grow). Each solver uses its defaults on this problem (KFRA is told the tanh),
plus ``kfac+polyak``: KFAC chained with ``curvax.polyak``. One jitted step per solver,
``(params, state, x, y) -> (params, state, loss)``, run ``--steps`` times with a
``block_until_ready`` each step so that the step time is the step's own. Recorded:

* ``non_finite_losses``: steps whose loss was NaN or ±inf; ``finite_at_end``: every
  parameter and state leaf finite after the last step; ``num_skipped``: the solver's
  counted skips (a skip is a guard working, not a failure, but a soak should have none);
* ``traces``: how many times the step's Python ran (a side effect in the traced
  function) and ``cache_size``: the jitted function's compiled-program count — both 1
  when nothing retraces;
* ``step_ms_start`` / ``step_ms_end``: median step time over the first window after the
  compiling step and over the last window, and their ratio; ``step_ms_p10_*`` the 10th
  percentiles (on a shared machine other jobs inflate a window's median);
* ``rss_mb_start`` / ``rss_mb_end``: the host's resident memory (``VmRSS`` from
  ``/proc/self/status``, Linux only) after the first window and at the end, and the
  growth in MB. One process runs every solver in turn, so a solver's start includes
  what the solvers before it left; the growth is its own.

Writes ``benchmarks/results/soak.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvax

RESULTS = pathlib.Path(__file__).parent / "results"
LOSS = "softmax_cross_entropy"
SIZES = (6, 16, 4)
BATCH = 32
POOL = 64

SOLVERS = {
    "curveball": lambda: curvax.curveball(LOSS),
    "hessian_free": lambda: curvax.hessian_free(LOSS),
    "sqn": lambda: curvax.sqn(LOSS),
    "lsr1": lambda: curvax.lsr1(LOSS),
    "kfac": lambda: curvax.kfac(LOSS),
    "kflr": lambda: curvax.kflr(LOSS),
    "kfra": lambda: curvax.kfra(LOSS, activations=jnp.tanh),
    "kfac+polyak": lambda: optax.chain(curvax.kfac(LOSS), curvax.polyak()),
}


def init_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w1": jax.random.normal(k1, SIZES[:2]) / np.sqrt(SIZES[0]),
          "b1": jnp.zeros((SIZES[1],)),
          "w2": jax.random.normal(k2, SIZES[1:]) / np.sqrt(SIZES[1])}


def predict(params, x):
  hidden = jnp.tanh(curvax.kron.dense(x, params["w1"], params["b1"]))
  return curvax.kron.dense(hidden, params["w2"])


def data_pool():
  """``POOL`` batches labelled by a fixed random linear teacher, 10 % of labels random.

  The noise keeps the optimum finite: on separable data the cross-entropy's curvature
  vanishes as the logits grow, and a soak would measure that instead.
  """
  rng = np.random.default_rng(0)
  x = rng.standard_normal((POOL, BATCH, SIZES[0])).astype(np.float32)
  teacher = rng.standard_normal((SIZES[0], SIZES[2])).astype(np.float32)
  y = np.argmax(x @ teacher, axis=-1)
  noisy = rng.random(y.shape) < 0.1
  y[noisy] = rng.integers(0, SIZES[2], noisy.sum())
  return jnp.asarray(x), jnp.asarray(y.astype(np.int32))


def solver(state):
  """The solver's own state: the state itself, or the first of a chain's."""
  return state if hasattr(state, "num_skipped") else state[0]


def rss_mb() -> float:
  """Resident set size of this process in MB (``nan`` where ``/proc`` is missing)."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return float("nan")


def soak(name: str, steps: int, window: int) -> dict:
  tx = SOLVERS[name]()
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)  # runs only while tracing: counts (re)traces
    updates, state = tx.update(None, state, params, predict_fn=lambda p: predict(p, x),
                               targets=y)
    return optax.apply_updates(params, updates), state, solver(state).loss

  xs, ys = data_pool()
  batches = [(xs[i], ys[i]) for i in range(POOL)]
  params = init_params()
  state = tx.init(params)
  times = np.empty(steps)
  losses = np.empty(steps)
  rss_start = float("nan")
  for i in range(steps):
    x, y = batches[i % POOL]
    start = time.perf_counter()
    params, state, loss = step(params, state, x, y)
    loss.block_until_ready()
    times[i] = time.perf_counter() - start
    losses[i] = float(loss)
    if i == window:
      rss_start = rss_mb()
  rss_end = rss_mb()
  solver_state = solver(state)
  first = times[1:window + 1]  # step 0 compiles
  last = times[-window:]
  ms_start, ms_end = 1e3 * statistics.median(first), 1e3 * statistics.median(last)
  # The 10th percentile as well: on a shared machine other jobs inflate the median of a
  # window; the fast steps show the step's own cost.
  fast_start, fast_end = 1e3 * np.percentile(first, 10), 1e3 * np.percentile(last, 10)
  finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves((params, state))
               if jnp.issubdtype(leaf.dtype, jnp.inexact))
  return {
      "steps": steps,
      "non_finite_losses": int(np.sum(~np.isfinite(losses))),
      "finite_at_end": finite,
      "num_skipped": int(solver_state.num_skipped),
      "loss_first_window": float(np.mean(losses[:window])),
      "loss_last_window": float(np.mean(losses[-window:])),
      "loss_max": float(np.max(losses)),
      "loss_final": float(losses[-1]),
      "traces": len(traces),
      "cache_size": int(step._cache_size()),
      "step_ms_start": round(ms_start, 4),
      "step_ms_end": round(ms_end, 4),
      "step_time_ratio": round(ms_end / ms_start, 3),
      "step_ms_p10_start": round(float(fast_start), 4),
      "step_ms_p10_end": round(float(fast_end), 4),
      "step_time_ratio_p10": round(float(fast_end / fast_start), 3),
      "rss_mb_start": round(rss_start, 1),
      "rss_mb_end": round(rss_end, 1),
      "rss_growth_mb": round(rss_end - rss_start, 1),
      "total_s": round(float(np.sum(times)), 1),
  }


def table(rows: dict) -> str:
  lines = ["| solver | non-finite losses | skipped | traces | step ms, median (start → end) | "
           "ratio | step ms, 10th pct | ratio | RSS MB (start → end) | "
           "loss (first → last window) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(
        f"| {name} | {r['non_finite_losses']} | {r['num_skipped']} | {r['traces']} | "
        f"{r['step_ms_start']:.3f} → {r['step_ms_end']:.3f} | {r['step_time_ratio']:.2f} | "
        f"{r['step_ms_p10_start']:.3f} → {r['step_ms_p10_end']:.3f} | "
        f"{r['step_time_ratio_p10']:.2f} | "
        f"{r['rss_mb_start']:.0f} → {r['rss_mb_end']:.0f} | "
        f"{r['loss_first_window']:.3f} → {r['loss_last_window']:.3f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20_000)
  parser.add_argument("--window", type=int, default=1000,
                      help="steps in the start and end windows compared")
  parser.add_argument("--only", default=None, help="comma-separated solver names")
  parser.add_argument("--output", default=str(RESULTS / "soak.json"))
  args = parser.parse_args()
  if args.steps < 2 * args.window + 1:
    parser.error("--steps must exceed twice --window")
  names = args.only.split(",") if args.only else list(SOLVERS)
  rows = {}
  for name in names:
    rows[name] = soak(name, args.steps, args.window)
    print(name, json.dumps(rows[name]), flush=True)
  result = {"command": "python -m benchmarks.soak " + (
                f"--steps {args.steps}" + (f" --only {args.only}" if args.only else "")),
            "problem": {"sizes": SIZES, "batch": BATCH, "pool_batches": POOL, "loss": LOSS},
            "platform": {"machine": platform.machine(), "python": platform.python_version(),
                         "jax": jax.__version__, "backend": jax.default_backend()},
            "solvers": rows}
  pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
  print(table(rows))


if __name__ == "__main__":
  main()
