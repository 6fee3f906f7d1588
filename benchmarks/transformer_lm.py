"""A byte-level causal transformer on Python's standard library: curvax vs tuned AdamW.

    python -m benchmarks.transformer_lm [--budget 50] [--small]

Data: the top-level ``*.py`` files of the running interpreter's standard library
(:mod:`curvax.problems.text`: bytes, vocabulary 256, train/validation split by file).
Model: :class:`curvax.problems.models.Transformer`, 2 pre-LayerNorm blocks, width 128,
4 heads, context 128; batches of 32 random windows (4096 next-byte predictions), the same
batch stream for every optimiser (from the step count and a seed).

* ``adamw``: ``optax.adamw`` with a linear warmup (5 % of the steps) and cosine decay to
  0 (``optax.warmup_cosine_decay_schedule``) over the steps that fit the budget (from
  the step's measured time); the peak learning rate is the best of a small grid, each
  run for ``budget / 4`` on a separate seed (initialisation and batches).
* ``kfac`` (defaults), ``kfac/reduce`` (``weight_sharing="reduce"``), ``curveball``,
  ``hessian_free``: no tuning argument (``--solvers`` adds ``sqn``, ``lsr1``, ``kflr``,
  ``ekfac`` and ``soap``: SOAP with its defaults, a constant rate, gradients in; its
  tuned comparison with AdamW is ``benchmarks/soap_vs_adamw.py``).
* ``adamw@kfac``: AdamW with the tuned rate scheduled over exactly as many updates as
  ``kfac`` made in its budget — the per-update baseline: "AdamW's final validation loss
  in that many updates".

Every optimiser gets the same wall-clock ``--budget`` of training steps; compilation is
timed apart, and neither it nor the validation loss (on 64 fixed windows of held-out
files, every ``budget / 30`` seconds) is in the budget. Losses are per byte (nats).

Reported: per optimiser, updates and seconds to AdamW's final validation loss (ratios);
updates for KFAC to reach ``adamw@kfac``'s final validation loss (the issue's goal:
≥ 1.5× fewer); and a step-cost section measured side by side in one process: a KFAC
step with ``expand`` and ``reduce``, and the shares of factor estimation and of the
inverses in it. Writes ``benchmarks/results/transformer_lm.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvax
from benchmarks.timing import median_times
from curvax import kron
from curvax.problems import models, text, training

RESULTS = pathlib.Path(__file__).parent / "results"
LOSS = curvax.losses.softmax_cross_entropy()
SOLVERS: dict[str, Callable] = {
    "kfac": lambda: curvax.kfac(LOSS),
    "kfac/reduce": lambda: curvax.kfac(LOSS, weight_sharing="reduce"),
    "curveball": lambda: curvax.curveball(LOSS),
    "hessian_free": lambda: curvax.hessian_free(LOSS),
    "sqn": lambda: curvax.sqn(LOSS),
    "lsr1": lambda: curvax.lsr1(LOSS),
    "kflr": lambda: curvax.kflr(LOSS),
    "ekfac": lambda: curvax.ekfac(LOSS),
    "soap": lambda: curvax.soap(),  # its defaults (lr 3e-3, constant), gradients in
}
FIRST_ORDER = ("soap",)
DEFAULT_SOLVERS = ("kfac", "kfac/reduce", "curveball", "hessian_free")
RATES = (1e-3, 3e-3, 1e-2)
WARMUP = 0.05  # share of the scheduled steps
VALIDATION_WINDOWS = 64
MODEL = models.Transformer(vocab_size=text.VOCAB_SIZE, width=128, num_heads=4,
                           num_blocks=2, context=128)
MODEL_SMALL = models.Transformer(vocab_size=text.VOCAB_SIZE, width=32, num_heads=2,
                                 num_blocks=1, context=32)


class Problem(NamedTuple):
  model: models.Transformer
  corpus: text.Corpus
  batch_size: int
  validation: tuple  # fixed (inputs, targets) windows of the held-out files

  @property
  def context(self) -> int:
    return self.model.context

  def batch(self, seed: int, step: int):
    return _windows(self.corpus.train, jax.random.fold_in(jax.random.PRNGKey(seed), step),
                    self.batch_size, self.context)


_windows = jax.jit(text.windows, static_argnums=(2, 3))


def problem(small: bool = False) -> Problem:
  """The benchmark's model and data; ``small``: a tiny model for smoke runs and tests."""
  corpus = text.load_stdlib()
  model, batch_size, windows = ((MODEL_SMALL, 8, 16) if small
                                else (MODEL, 32, VALIDATION_WINDOWS))
  validation = _windows(corpus.validation, jax.random.PRNGKey(12345), windows,
                        model.context)
  return Problem(model, corpus, batch_size, validation)


def adamw(rate: float, steps: int) -> optax.GradientTransformation:
  """``optax.adamw`` with a linear warmup to ``rate`` and cosine decay to 0 over ``steps``."""
  steps = max(int(steps), 2)
  return optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, rate, warmup_steps=max(1, int(WARMUP * steps)), decay_steps=steps))


def run_one(prob: Problem, tx, *, second_order: bool, budget: float = np.inf,
            max_steps: int | None = None, seed: int, eval_every: float) -> dict:
  """Train for ``budget`` seconds of steps (or ``max_steps`` steps), recording the batch
  loss of every step and the validation loss every ``eval_every`` seconds (both per
  byte)."""
  params = prob.model.init(jax.random.PRNGKey(seed), prob.validation[0][:1])
  per_byte = 1.0 / prob.context
  val_x, val_y = prob.validation
  evaluate = jax.jit(lambda p: LOSS.value(prob.model.apply(p, val_x), val_y) * per_byte)
  step = training.make_step(prob.model, tx, LOSS, second_order=second_order)
  state = tx.init(params)
  x, y = prob.batch(seed, 0)
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the LayerNorm fallback warning, once per solver
    compiled = step.lower(params, state, x, y).compile()
  record = {"compile_seconds": time.perf_counter() - start, "train_loss": [],
            "step": [0], "seconds": [0.0], "validation_loss": [float(evaluate(params))]}
  clock, steps, next_eval = 0.0, 0, eval_every
  max_steps = np.inf if max_steps is None else max_steps
  while clock < budget and steps < max_steps:
    start = time.perf_counter()
    params, state, value = jax.block_until_ready(compiled(params, state, x, y))
    clock += time.perf_counter() - start
    steps += 1
    record["train_loss"].append(float(value) * per_byte)
    x, y = prob.batch(seed, steps)
    if clock >= next_eval or clock >= budget or steps >= max_steps:
      record["step"].append(steps)
      record["seconds"].append(clock)
      record["validation_loss"].append(float(evaluate(params)))
      next_eval = clock + eval_every
  return record


def adamw_steps_in(prob: Problem, rate: float, budget: float, seed: int) -> int:
  """How many AdamW steps fit ``budget`` seconds (median of timed steps), to set the
  schedule's length."""
  params = prob.model.init(jax.random.PRNGKey(seed), prob.validation[0][:1])
  tx = adamw(rate, 100)
  step = training.make_step(prob.model, tx, LOSS, second_order=False)
  state, (x, y) = tx.init(params), prob.batch(seed, 0)
  seconds = median_times({"adamw": lambda: step(params, state, x, y)}, repeats=9)["adamw"]
  return max(int(budget / seconds), 2)


def first_reaching(record: dict, target: float, axis: str):
  """``axis`` ("step" or "seconds") at the first validation loss ≤ ``target``."""
  for at, value in zip(record[axis], record["validation_loss"]):
    if np.isfinite(value) and value <= target:
      return at
  return None


def tune_adamw(prob, *, budget, seed, eval_every, progress) -> tuple[float, dict]:
  """The grid's best peak rate: final validation loss after ``budget`` seconds."""
  finals = {}
  for rate in RATES:
    steps = adamw_steps_in(prob, rate, budget, seed)
    record = run_one(prob, adamw(rate, steps), second_order=False, budget=budget,
                     seed=seed, eval_every=eval_every)
    final = record["validation_loss"][-1]
    finals[rate] = final if np.isfinite(final) else np.inf
    progress.update(1)
  return min(finals, key=finals.get), finals


def run(*, budget: float = 50.0, solvers=DEFAULT_SOLVERS, small: bool = False,
        seed: int = 0) -> dict:
  """Tuning, then every optimiser on the same batches; ``{"curves": ..., "adamw": ...}``."""
  from tqdm.auto import tqdm
  prob = problem(small)
  eval_every = budget / 30
  progress = tqdm(total=len(RATES) + 2 + len(solvers), desc="transformer_lm", unit="run")
  progress.set_postfix_str("tuning adamw")
  rate, finals = tune_adamw(prob, budget=budget / 4, seed=seed + 1, eval_every=eval_every,
                            progress=progress)
  progress.set_postfix_str("adamw")
  planned = adamw_steps_in(prob, rate, budget, seed)
  curves = {"adamw": run_one(prob, adamw(rate, planned), second_order=False,
                             budget=budget, seed=seed, eval_every=eval_every)}
  curves["adamw"].update(learning_rate=rate, scheduled_steps=planned,
                         tuning={str(k): v for k, v in finals.items()})
  progress.update(1)
  for name in solvers:
    progress.set_postfix_str(name)
    curves[name] = run_one(prob, SOLVERS[name](), second_order=name not in FIRST_ORDER,
                           budget=budget, seed=seed, eval_every=eval_every)
    progress.update(1)
  if "kfac" in curves:
    # The per-update baseline: AdamW's schedule over exactly the updates KFAC made.
    progress.set_postfix_str("adamw@kfac")
    updates = curves["kfac"]["step"][-1]
    curves["adamw@kfac"] = run_one(
        prob, adamw(rate, updates), second_order=False, max_steps=updates, seed=seed,
        eval_every=budget / 30 * updates / max(curves["adamw"]["step"][-1], 1))
    curves["adamw@kfac"].update(learning_rate=rate, scheduled_steps=updates)
  progress.update(1)
  progress.close()
  return curves


def step_costs(small: bool = False, repeats: int = 7) -> dict:
  """One KFAC step (expand, reduce) side by side with AdamW's, and its parts.

  Steps are timed from the state after one step (count 1: no γ or τ rule runs), so a
  step is: capture + gradient, factor estimation, inverses (``inverse_period=1``, the
  default), preconditioning and ``α*``. The inverses' share is the difference to the
  same step with ``inverse_period`` too large to fall due; the factors' share is the
  difference between capture + gradient + :func:`curvax.kron.kfac_factors` and capture
  + gradient alone (both jitted on their own).
  """
  prob = problem(small)
  x, y = prob.batch(0, 0)
  params = prob.model.init(jax.random.PRNGKey(0), x)
  predict = lambda p: prob.model.apply(p, x)
  fns = {}
  adam = adamw(1e-3, 100)
  adam_step = training.make_step(prob.model, adam, LOSS, second_order=False)
  adam_state = adam.init(params)
  fns["adamw"] = lambda: adam_step(params, adam_state, x, y)

  def gradient(p):
    return kron.capture(predict, p, loss=LOSS, targets=y, warn=False).grad()
  grad_fn = jax.jit(gradient)
  fns["capture+gradient"] = lambda: grad_fn(params)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for sharing in ("expand", "reduce"):
      for label, period in (("step", 1), ("step without inverses", 2**30)):
        # No γ or τ rule falls due at count 1; leaving them out only saves compile time.
        tx = curvax.kfac(LOSS, weight_sharing=sharing, inverse_period=period,
                         gamma_period=0, tau_period=0)
        update = jax.jit(lambda p, s, tx=tx: tx.update(None, s, p, predict_fn=predict,
                                                       targets=y))
        _, state = update(params, tx.init(params))  # count 1
        fns[f"{sharing}: {label}"] = lambda update=update, state=state: update(params, state)

      def estimate(p, sharing=sharing):
        cap = kron.capture(predict, p, loss=LOSS, targets=y, warn=False)
        return cap.grad(), kron.kfac_factors(cap, jax.random.PRNGKey(0),
                                             weight_sharing=sharing)
      estimate_fn = jax.jit(estimate)
      fns[f"{sharing}: capture+gradient+factors"] = lambda f=estimate_fn: f(params)
    times = median_times(fns, repeats=repeats, warmup=1)
  out = {"seconds": {k: round(v, 4) for k, v in times.items()}}
  for sharing in ("expand", "reduce"):
    step = times[f"{sharing}: step"]
    out[sharing] = {
        "step / adamw step": round(step / times["adamw"], 2),
        "factor share": round((times[f"{sharing}: capture+gradient+factors"]
                               - times["capture+gradient"]) / step, 3),
        "inverse share": round((step - times[f"{sharing}: step without inverses"]) / step,
                               3)}
  out["reduce step / expand step"] = round(times["reduce: step"] / times["expand: step"], 3)
  return out


def summarise(curves: dict) -> dict:
  """Targets, and per optimiser: updates/seconds to AdamW's final validation loss and
  the ratios to AdamW's own; KFAC's updates to ``adamw@kfac``'s final loss."""
  adam = curves["adamw"]
  target = adam["validation_loss"][-1]
  adam_steps, adam_seconds = adam["step"][-1], adam["seconds"][-1]
  rows = {}
  for name, record in curves.items():
    steps, seconds = first_reaching(record, target, "step"), first_reaching(
        record, target, "seconds")
    final = record["validation_loss"][-1]
    rows[name] = {
        "updates": record["step"][-1], "final_validation_loss": round(final, 4),
        "seconds_per_update": round(record["seconds"][-1] / max(record["step"][-1], 1), 4),
        "compile_seconds": round(record["compile_seconds"], 1),
        "updates_to_target": steps, "seconds_to_target": seconds,
        "update_ratio": None if steps is None else round(adam_steps / steps, 2),
        "wall_clock_ratio": None if seconds is None else round(adam_seconds / seconds, 2),
        # How far AdamW had to go for this optimiser's final loss (its own schedule).
        "adamw_updates_to_this_loss": first_reaching(adam, final, "step"),
        "adamw_seconds_to_this_loss": first_reaching(adam, final, "seconds")}
  summary = {"adamw_final_validation_loss": round(target, 4), "optimisers": rows}
  if "adamw@kfac" in curves:
    per_update = curves["adamw@kfac"]["validation_loss"][-1]
    budget = curves["adamw@kfac"]["step"][-1]
    summary["per_update"] = {"adamw_updates": budget,
                             "adamw_final_validation_loss": round(per_update, 4)}
    for name in ("kfac", "kfac/reduce"):
      if name in curves:
        steps = first_reaching(curves[name], per_update, "step")
        summary["per_update"][name] = {
            "updates_to_target": steps,
            "update_ratio": None if steps is None else round(budget / steps, 2)}
  return summary


def markdown(summary: dict, costs: dict | None = None) -> str:
  rows = summary["optimisers"]
  fmt = lambda v: "never" if v is None else f"{v:g}"
  lines = [f"Target: AdamW's final validation loss {summary['adamw_final_validation_loss']:.3f}"
           " nats/byte", "",
           "| optimiser | updates | s/update | final val. loss | updates to target "
           "(AdamW ÷ it) | seconds to target (AdamW ÷ it) |", "|---|---|---|---|---|---|"]
  for name, row in rows.items():
    lines.append(f"| {name} | {row['updates']} | {row['seconds_per_update']:.3f} | "
                 f"{row['final_validation_loss']:.3f} | {fmt(row['updates_to_target'])} "
                 f"({fmt(row['update_ratio'])}) | {fmt(row['seconds_to_target'] and round(row['seconds_to_target'], 1))} "
                 f"({fmt(row['wall_clock_ratio'])}) |")
  per = summary.get("per_update")
  if per:
    lines += ["", f"Per update: AdamW scheduled over {per['adamw_updates']} updates (KFAC's "
              f"count) ends at {per['adamw_final_validation_loss']:.3f}; "
              + "; ".join((f"{k} does not reach it" if v["updates_to_target"] is None
                           else f"{k} reaches it after {v['updates_to_target']} updates "
                           f"({v['update_ratio']:g}× fewer)") for k, v in per.items()
                          if isinstance(v, dict))]
  if costs:
    lines += ["", "| KFAC step (count 1, no γ/τ rule) | ÷ AdamW step | factor share | "
              "inverse share |", "|---|---|---|---|"]
    for sharing in ("expand", "reduce"):
      c = costs[sharing]
      lines.append(f"| {sharing} | {c['step / adamw step']} | {c['factor share']:.0%} | "
                   f"{c['inverse share']:.0%} |")
    lines += ["", f"reduce step ÷ expand step: {costs['reduce step / expand step']}"]
  return "\n".join(lines)


def plot(curves: dict, path) -> None:
  """Validation loss (top) and smoothed batch loss (bottom) vs updates and seconds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colours = dict(zip(["adamw", "adamw@kfac", *SOLVERS], plt.get_cmap("tab10").colors))
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  for name, record in curves.items():
    style = dict(color=colours.get(name), label=name,
                 ls="--" if name.startswith("adamw") else "-")
    axes[0, 0].plot(record["step"], record["validation_loss"], **style)
    axes[0, 1].plot(record["seconds"], record["validation_loss"], **style)
    train = np.asarray(record["train_loss"])
    if train.size:
      width = max(1, train.size // 40)
      smooth = np.convolve(train, np.ones(width) / width, mode="valid")
      steps = np.arange(width, train.size + 1)
      axes[1, 0].plot(steps, smooth, **style)
      per_step = record["seconds"][-1] / train.size
      axes[1, 1].plot(steps * per_step, smooth, **style)
  finite = [v for r in curves.values() for v in r["validation_loss"] if np.isfinite(v)]
  for (row, column), ax in np.ndenumerate(axes):
    ax.set(xlabel="updates" if column == 0 else "seconds (compile excluded)",
           ylabel=("validation" if row == 0 else "batch (smoothed)") + " loss, nats/byte",
           yscale="log", ylim=(0.9 * min(finite), 1.1 * max(finite)))
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget", type=float, default=50.0,
                      help="seconds of training per optimiser (the default run: ~12 min)")
  parser.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS),
                      help=f"any of {', '.join(SOLVERS)}")
  parser.add_argument("--small", action="store_true", help="a tiny model (smoke runs)")
  parser.add_argument("--repeats", type=int, default=7, help="of the step-cost timing")
  parser.add_argument("--out", default=str(RESULTS / "transformer_lm"))
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  costs = step_costs(args.small, repeats=args.repeats)
  curves = run(budget=args.budget, solvers=tuple(args.solvers.split(",")),
               small=args.small)
  summary = summarise(curves)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(
      {"budget_seconds": args.budget, "small": args.small,
       "backend": jax.default_backend(), "device": str(jax.devices()[0]),
       "model": {k: getattr(MODEL_SMALL if args.small else MODEL, k) for k in
                 ("width", "num_heads", "num_blocks", "context", "vocab_size")},
       "summary": summary, "step_costs": costs, "curves": curves}, indent=1))
  plot(curves, out.with_suffix(".png"))
  print(markdown(summary, costs))


if __name__ == "__main__":
  main()
