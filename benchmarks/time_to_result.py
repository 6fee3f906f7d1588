"""Time to result: AlgoPerf's rules (Dahl et al. 2023), scaled to a 2-core CPU.

    python -m benchmarks.time_to_result [--quick] [--workloads ...] [--optimisers ...]
        [--rulesets targets,external,self_tuning] [--merge] [--report]

``benchmarks/time_to_loss`` asks how fast the training loss falls; this asks how fast an
optimiser reaches a *validation* target, the way MLCommons AlgoPerf scores training
algorithms. The rules, as implemented here:

Workloads (:mod:`curvax.problems.suite`; the data never trained on from
:func:`suite.heldout`):

* ``autoencoder`` — the paper-scale MNIST autoencoder; validation: reconstruction BCE
  (nats per image, summed over pixels) on 5 000 held-out images;
* ``mlp``, ``cnn`` — CurveBall's MNIST MLP and the basic CNN; validation: error rate on
  5 000 (CNN: 2 000) held-out images;
* ``char_lm`` — a byte-level transformer on the standard library's source; validation:
  cross-entropy per byte (nats) on 512 windows of held-out files.

  The MNIST validation images are the last ones of MNIST's training split, which no
  workload trains on; the MNIST test set (as many images) is evaluated at the end of
  every run and reported beside, never used for targets or selection.

Clock: only jitted training steps count. Compilation is timed and reported apart; the
validation metric is evaluated off the clock every ``budget / 15`` training seconds (a
fixed interval per workload, the same for every optimiser) and a run's time to target
is the training time at the first evaluation at or below the target; a run stops there.

Targets and ``max_runtime`` (AlgoPerf's target-setting procedure, smaller): the
first-order baselines (NAdamW, SGD + heavy-ball/Nesterov momentum) each get
``--target-trials`` (default 8) trials from their search spaces below, each run for the
workload's nominal budget; the trial with the best validation result is rerun for
``LONG`` (2) × the budget on ``--seeds`` (3) seeds. The **target** is the median over
those seeds of each run's best validation result; ``max_runtime`` is ``MAX_RUNTIME_FACTOR``
(1.5) × the median over seeds of the time each needed to reach it (a margin over the
time it needed, so the target-setting configuration itself reaches its target on every
seed). Recorded in ``benchmarks/results/time_to_result_targets.json``.

Batch size is a hyperparameter of every optimiser (×0.5, ×1 or ×2 the workload's
default under external tuning; the default under self-tuning): a trial's data stream
depends on it.

External tuning: every optimiser gets the same ``--trials`` (5) trials drawn at random
from the search space it declares in :data:`OPTIMISERS` (one random stream per
workload, optimiser and study), each run for ``max_runtime``; repeated over ``--studies``
(3) studies. A workload's time is the median over studies of the fastest trial's time to
target (∞ where no trial reaches it).

Self-tuning: defaults only (the batch size too), ``--seeds`` (3) seeds, a budget of
``SELF_TUNING_FACTOR`` (1.5) × ``max_runtime``; the time is the median over seeds.

Score, per ruleset: the performance ratio of an optimiser on a workload is its time
over the fastest optimiser's time there; the performance profile ρ(τ) is the share of
workloads with ratio ≤ τ, and the score its integral over [1, r_max] divided by
``r_max − 1`` (r_max = 4): 1 is fastest everywhere, 0 never within 4× the fastest.

Every curvax solver runs under self-tuning (with NAdamW and SGD's defaults as
references); KFAC, KFRA and CurveBall also under external tuning, beside the baselines.
``--quick`` shrinks data, models and budgets and runs 1 study × 2 trials and 1 seed:
a smoke run whose numbers go to ``time_to_result_quick*`` and are not the benchmark's
result. Its goal, < 10 min for all four workloads, is an estimate for a quiet 2-core
machine, where a Kronecker solver compiles in ~6 s; with the 2 cores shared by ~15
processes a KFAC step took 80–120 s to compile and the quick run 20–45 min per workload. The full run takes hours (docs/guides/benchmarks.md): split it with
``--workloads``/``--rulesets`` and ``--merge`` the parts into one JSON.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import pathlib
import statistics
import time
import warnings
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvax
from curvax.problems import suite

RESULTS = pathlib.Path(__file__).parent / "results"
README = pathlib.Path(__file__).parent.parent / "README.md"
WORKLOADS = ("autoencoder", "mlp", "cnn", "char_lm")
METRICS = {"autoencoder": "BCE", "mlp": "error rate", "cnn": "error rate",
           "char_lm": "nats/byte"}
# Nominal training seconds per workload (target-setting trials run this long).
BUDGETS = {"autoencoder": 40.0, "mlp": 20.0, "cnn": 40.0, "char_lm": 40.0}
QUICK_BUDGETS = {"autoencoder": 1.5, "mlp": 1.0, "cnn": 1.5, "char_lm": 1.5}
QUICK_SCALE = 0.1  # of the data (and the LM's model), in --quick
EVALUATIONS = 15  # per nominal budget: the evaluation interval is budget / 15
LONG = 2.0  # target-setting reruns: this many nominal budgets
MAX_RUNTIME_FACTOR = 1.5
SELF_TUNING_FACTOR = 1.5
R_MAX = 4.0
TARGET_STUDY = "target"  # the random stream of the target-setting trials


# ---------------------------------------------------------------------------------
# Search spaces


class LogUniform(NamedTuple):
  low: float
  high: float

  def sample(self, rng: np.random.Generator) -> float:
    return float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))


class OneMinusLogUniform(NamedTuple):
  """``1 − x`` with ``x`` log-uniform in ``[low, high]`` (AlgoPerf's β₁ / momentum)."""
  low: float
  high: float

  def sample(self, rng: np.random.Generator) -> float:
    return 1.0 - LogUniform(self.low, self.high).sample(rng)


class Choice(NamedTuple):
  values: tuple

  def sample(self, rng: np.random.Generator):
    return self.values[int(rng.integers(len(self.values)))]


# Every optimiser's batch size: a multiple of the workload's default.
BATCH_SCALE = Choice((0.5, 1.0, 2.0))


class Optimiser(NamedTuple):
  """One entry of the registry.

  Attributes:
    make: ``(workload, **hyperparameters) -> transform``.
    second_order: a curvax solver fed ``predict_fn``/``targets`` (else: gradients).
    space: the external-tuning search space (``batch_scale`` is added to every one).
    external: run under external tuning too (every optimiser runs under self-tuning).
  """
  make: Callable[..., optax.GradientTransformation]
  second_order: bool
  space: dict
  external: bool


def _has_curvature_fraction(factory) -> bool:
  return "curvature_fraction" in inspect.signature(factory).parameters


def _kron_space(factory) -> dict:
  space = {"gamma": LogUniform(1e-5, 1e-2), "learning_rate": LogUniform(0.1, 1.0),
           "inverse_period": Choice((2, 5, 10, 20)), "factor_period": Choice((1, 2, 5))}
  if _has_curvature_fraction(factory):  # the lead's argument, where it exists
    space["curvature_fraction"] = Choice((0.125, 0.25, 0.5, 1.0))
  return space


def _nadamw(w, learning_rate=1e-3, b1=0.9, b2=0.999, weight_decay=1e-4):
  return optax.nadamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)


def _sgd(w, learning_rate=1e-2, momentum=0.9, nesterov=False):
  return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


def _soap(w, **hyper):
  # A first-order-style transform like adam: its own defaults, a rate only if required.
  params = inspect.signature(curvax.soap).parameters
  needs_rate = ("learning_rate" in params
                and params["learning_rate"].default is inspect.Parameter.empty)
  return curvax.soap(**({"learning_rate": 3e-3} if needs_rate else {}), **hyper)


OPTIMISERS: dict[str, Optimiser] = {
    "nadamw": Optimiser(_nadamw, False, {
        "learning_rate": LogUniform(1e-4, 1e-2), "b1": OneMinusLogUniform(0.02, 0.3),
        "b2": OneMinusLogUniform(1e-3, 0.1), "weight_decay": LogUniform(1e-6, 1e-2)},
        True),
    "sgd+momentum": Optimiser(_sgd, False, {
        "learning_rate": LogUniform(1e-3, 0.3), "momentum": OneMinusLogUniform(0.01, 0.3),
        "nesterov": Choice((False, True))}, True),
    "kfac": Optimiser(lambda w, **h: curvax.kfac(w.problem.loss, **h), True,
                      _kron_space(curvax.kfac), True),
    # KFRA's one structural argument: which elementwise function the chain applies.
    "kfra": Optimiser(lambda w, **h: curvax.kfra(w.problem.loss,
                                                 activations=w.problem.activation, **h),
                      True, _kron_space(curvax.kfra), True),
    "curveball": Optimiser(lambda w, **h: curvax.curveball(w.problem.loss, **h), True, {
        "damping": LogUniform(0.03, 30.0), "learning_rate": LogUniform(0.3, 1.0),
        "damping_period": Choice((1, 5, 20))}, True),
    "kflr": Optimiser(lambda w, **h: curvax.kflr(w.problem.loss, **h), True,
                      _kron_space(curvax.kflr), False),
    "hessian_free": Optimiser(lambda w, **h: curvax.hessian_free(w.problem.loss, **h),
                              True, {}, False),
    "sqn": Optimiser(lambda w, **h: curvax.sqn(w.problem.loss, **h), True, {}, False),
    "lsr1": Optimiser(lambda w, **h: curvax.lsr1(w.problem.loss, **h), True, {}, False),
    "ekfac": Optimiser(lambda w, **h: curvax.ekfac(w.problem.loss, **h), True, {}, False),
    "soap": Optimiser(_soap, False, {}, False),
}
FIRST_ORDER = ("nadamw", "sgd+momentum")


def sample_trials(optimiser: str, workload: str, study, count: int) -> list[dict]:
  """``count`` hyperparameter sets from ``optimiser``'s space (plus the batch scale),
  from a random stream fixed by the workload, the optimiser and the study."""
  rng = np.random.default_rng(zlib.crc32(f"{workload}/{optimiser}/{study}".encode()))
  space = {**OPTIMISERS[optimiser].space, "batch_scale": BATCH_SCALE}
  return [{k: d.sample(rng) for k, d in space.items()} for _ in range(count)]


# ---------------------------------------------------------------------------------
# Workloads and runs


class Workload(NamedTuple):
  name: str
  problem: suite.Problem
  validate: Callable[[Any], jax.Array]  # params -> validation metric (lower is better)
  test: Callable[[Any], jax.Array] | None
  budget: float  # nominal training seconds

  @property
  def eval_every(self) -> float:
    return self.budget / EVALUATIONS


def _metric_fn(name: str, prob: suite.Problem, data) -> Callable:
  """A jitted ``params -> metric`` on ``data`` (held out): BCE, error rate or nats/byte."""
  apply = lambda p: prob.model.apply(p, data.inputs)
  if name == "autoencoder":
    return jax.jit(lambda p: prob.loss.value(apply(p), data.inputs))
  if name == "char_lm":  # curvax's loss sums over positions: per byte, divide by them
    return jax.jit(lambda p: prob.loss.value(apply(p), data.labels) / prob.context)
  return jax.jit(lambda p: jnp.mean(jnp.argmax(apply(p), -1) != data.labels))


def workload(name: str, *, quick: bool = False) -> Workload:
  scale = QUICK_SCALE if quick else 1.0
  prob = suite.problem(name, scale=scale)
  validate = _metric_fn(name, prob, suite.heldout(name, "validation", scale=scale))
  test = (None if name == "char_lm"
          else _metric_fn(name, prob, suite.heldout(name, "test", scale=scale)))
  return Workload(name, prob, validate, test, (QUICK_BUDGETS if quick else BUDGETS)[name])


def attempt(w: Workload, optimiser: str, hyper: dict, *, seed: int, budget: float,
            target: float | None) -> dict:
  """One run: train until the validation metric reaches ``target`` (if given), it turns
  non-finite, or ``budget`` training seconds pass. Returns the run's record."""
  hyper = dict(hyper)
  batch_size = max(1, round(w.problem.batch_size * hyper.pop("batch_scale", 1.0)))
  record = {"hyperparameters": hyper, "batch_size": batch_size, "seed": seed}
  opt = OPTIMISERS[optimiser]
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. the LayerNorm fallback warning
      run = suite.Run(w.problem._replace(batch_size=batch_size), opt.make(w, **hyper),
                      second_order=opt.second_order, seed=seed, evaluate=w.validate,
                      metric="validation")
  except ValueError as error:  # e.g. KFRA on a network that is not a Dense chain
    return {**record, "unsupported": str(error).splitlines()[0]}
  reached = None
  while run.seconds < budget:
    value = run.advance(min(run.seconds + w.eval_every, budget))
    if not math.isfinite(value):
      break
    if target is not None and value <= target:
      reached = run.seconds
      break
  curve = run.record["validation"]
  finite = [v for v in curve if math.isfinite(v)]
  record.update(
      time_to_target=reached, steps=run.steps, seconds=round(run.seconds, 3),
      compile_seconds=round(run.compile_seconds, 2),
      best_validation=min(finite) if finite else None,
      final_validation=curve[-1] if math.isfinite(curve[-1]) else None,
      diverged=not math.isfinite(curve[-1]),
      test=None if w.test is None else float(w.test(run.params)),
      curve={"seconds": [round(s, 3) for s in run.record["seconds"]],
             "validation": [v if math.isfinite(v) else None for v in curve]})
  return record


def first_reaching(curve: dict, target: float) -> float:
  """Training seconds at the first evaluation ≤ ``target`` (∞ if none)."""
  for seconds, value in zip(curve["seconds"], curve["validation"]):
    if value is not None and value <= target:
      return seconds
  return math.inf


def set_target(w: Workload, *, trials: int, seeds: int, progress, save) -> dict:
  """AlgoPerf's target setting, scaled (module docstring): the target and max_runtime.

  ``save(entry)`` is called after every run with the partial entry, so a long
  target-setting run that is stopped leaves its finished runs on disk.
  """
  entry = {"metric": METRICS[w.name], "budget": w.budget, "tuning": {}, "long": []}
  for opt in FIRST_ORDER:
    entry["tuning"][opt] = []
    for index, hyper in enumerate(sample_trials(opt, w.name, TARGET_STUDY, trials)):
      progress.set_postfix_str(f"{w.name}: target setting, {opt} trial {index}")
      record = attempt(w, opt, hyper, seed=1000 + index, budget=w.budget, target=None)
      record["batch_scale"] = hyper["batch_scale"]
      entry["tuning"][opt].append(record)
      save(entry)
      progress.update(1)
  candidates = [(r["best_validation"], opt, r) for opt, rs in entry["tuning"].items()
                for r in rs if r.get("best_validation") is not None]
  if not candidates:
    raise RuntimeError(f"{w.name}: every target-setting trial diverged")
  _, best_opt, best = min(candidates, key=lambda c: c[0])
  hyper = {**best["hyperparameters"], "batch_scale": best["batch_scale"]}
  entry["best"] = {"optimiser": best_opt, "hyperparameters": hyper}
  for seed in range(seeds):
    progress.set_postfix_str(f"{w.name}: target setting, {best_opt} seed {seed}")
    entry["long"].append(attempt(w, best_opt, hyper, seed=seed, budget=LONG * w.budget,
                                 target=None))
    save(entry)
    progress.update(1)
  target = statistics.median(r["best_validation"] for r in entry["long"])
  needed = statistics.median(first_reaching(r["curve"], target) for r in entry["long"])
  entry.update(target=target, seconds_needed=needed,
               max_runtime=MAX_RUNTIME_FACTOR * needed, complete=True)
  save(entry)
  return entry


# ---------------------------------------------------------------------------------
# Scoring (pure: tested in tests/test_time_to_result.py)


def run_time(record: dict) -> float:
  """A run's time to target; ∞ if it never reached it or could not run."""
  value = record.get("time_to_target")
  return math.inf if value is None else float(value)


def external_time(studies: Sequence[Sequence[float]]) -> float:
  """Median over studies of the fastest trial's time (∞ where none reached)."""
  return float(np.median([min(trials, default=math.inf) for trials in studies]))


def self_tuning_time(seeds: Sequence[float]) -> float:
  """Median over seeds."""
  return float(np.median(seeds))


def performance_ratios(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
  """``{optimiser: {workload: time}}`` → each time over the fastest on that workload
  (∞ where it never reached the target or nobody did)."""
  workloads = {w for row in times.values() for w in row}
  best = {w: min((row.get(w, math.inf) for row in times.values()), default=math.inf)
          for w in workloads}
  return {opt: {w: (row.get(w, math.inf) / best[w] if math.isfinite(best[w])
                    and math.isfinite(row.get(w, math.inf)) else math.inf)
                for w in sorted(workloads)} for opt, row in times.items()}


def profile(ratios: Sequence[float], tau) -> np.ndarray:
  """ρ(τ): the share of workloads whose ratio is ≤ τ."""
  ratios = np.asarray(list(ratios), float)
  return np.mean(ratios[None, :] <= np.asarray(tau, float)[..., None], axis=-1)


def score(ratios: Sequence[float], r_max: float = R_MAX) -> float:
  """∫₁^{r_max} ρ(τ) dτ / (r_max − 1), exactly: ρ is a step function, so a workload of
  ratio r ≤ r_max adds (r_max − r) / (r_max − 1) / #workloads."""
  ratios = list(ratios)
  if not ratios:
    return 0.0
  return float(np.mean([max(r_max - r, 0.0) / (r_max - 1.0) if math.isfinite(r) else 0.0
                        for r in ratios]))


def times_of(data: dict, ruleset: str) -> dict[str, dict[str, float]]:
  """``{optimiser: {workload: time}}`` of a ruleset from the results JSON."""
  times: dict[str, dict[str, float]] = {}
  for w, rows in data.get(ruleset, {}).items():
    for opt, row in rows.items():
      if ruleset == "external":
        t = external_time([[run_time(r) for r in study] for study in row["studies"]])
      else:
        t = self_tuning_time([run_time(r) for r in row["seeds"]])
      times.setdefault(opt, {})[w] = t
  return times


def scores_of(data: dict, ruleset: str) -> dict[str, float]:
  ratios = performance_ratios(times_of(data, ruleset))
  return {opt: score(row.values()) for opt, row in ratios.items()}


# ---------------------------------------------------------------------------------
# Driver


def _json_safe(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def _write(path: pathlib.Path, data: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(_json_safe(data), indent=1))
  tmp.replace(path)  # atomic: a stopped run never leaves half a file


def paths(out: pathlib.Path) -> dict[str, pathlib.Path]:
  return {"json": out.with_suffix(".json"), "png": out.with_suffix(".png"),
          "targets": out.with_name(out.name + "_targets.json")}


def run(args) -> dict:
  from tqdm.auto import tqdm
  files = paths(pathlib.Path(args.out))
  workloads = args.workloads.split(",")
  optimisers = [o for o in args.optimisers.split(",") if o in OPTIMISERS]
  rulesets = args.rulesets.split(",")
  settings = {"quick": args.quick, "studies": args.studies, "trials": args.trials,
              "seeds": args.seeds, "target_trials": args.target_trials,
              "budgets": QUICK_BUDGETS if args.quick else BUDGETS,
              "max_runtime_factor": MAX_RUNTIME_FACTOR,
              "self_tuning_factor": SELF_TUNING_FACTOR, "long": LONG, "r_max": R_MAX,
              "backend": jax.default_backend(), "device": str(jax.devices()[0])}
  targets = (json.loads(files["targets"].read_text()) if files["targets"].exists()
             else {"settings": settings, "workloads": {}})
  if targets["settings"].get("quick") != args.quick:
    raise SystemExit(f"{files['targets']} was set with quick={not args.quick}")
  data = {"settings": settings, "external": {}, "self_tuning": {}, "merged": []}
  if args.merge and files["json"].exists():
    data = json.loads(files["json"].read_text())
    if data["settings"]["quick"] != args.quick:
      raise SystemExit(f"--merge: {files['json']} was run with quick="
                       f"{data['settings']['quick']}")
    data["merged"].append({"workloads": workloads, "optimisers": optimisers,
                           "rulesets": rulesets})

  def needs_target(name):
    return args.retarget or not targets["workloads"].get(name, {}).get("complete")
  external = [o for o in optimisers if OPTIMISERS[o].external]
  total = 0
  for name in workloads:
    if "targets" in rulesets and needs_target(name):
      total += len(FIRST_ORDER) * args.target_trials + args.seeds
    if "external" in rulesets:
      total += len(external) * args.studies * args.trials
    if "self_tuning" in rulesets:
      total += len(optimisers) * args.seeds
  progress = tqdm(total=total, desc="time_to_result", unit="run")
  for name in workloads:
    w = workload(name, quick=args.quick)
    if "targets" in rulesets and needs_target(name):
      def save(entry, name=name):
        targets["workloads"][name] = entry
        _write(files["targets"], targets)
      set_target(w, trials=args.target_trials, seeds=args.seeds, progress=progress,
                 save=save)
    entry = targets["workloads"].get(name, {})
    if not entry.get("complete"):
      if {"external", "self_tuning"} & set(rulesets):
        print(f"{name}: no target yet (run --rulesets targets first); skipped")
      continue
    target, max_runtime = entry["target"], entry["max_runtime"]
    data.setdefault("targets", {})[name] = {
        **{k: entry[k] for k in ("metric", "target", "max_runtime", "seconds_needed")},
        "set_by": entry["best"]["optimiser"]}
    if "external" in rulesets:
      for opt in external:
        studies = []
        for study in range(args.studies):
          trials = []
          for index, hyper in enumerate(sample_trials(opt, name, study, args.trials)):
            progress.set_postfix_str(f"{name}: {opt} study {study} trial {index}")
            record = attempt(w, opt, hyper, seed=100 * study + index,
                             budget=max_runtime, target=target)
            record["batch_scale"] = hyper["batch_scale"]
            trials.append(record)
            progress.update(1)
          studies.append(trials)
        data["external"].setdefault(name, {})[opt] = {"studies": studies}
        _write(files["json"], data)
    if "self_tuning" in rulesets:
      for opt in optimisers:
        seeds = []
        for seed in range(args.seeds):
          progress.set_postfix_str(f"{name}: {opt} (defaults) seed {seed}")
          seeds.append(attempt(w, opt, {}, seed=seed,
                               budget=SELF_TUNING_FACTOR * max_runtime, target=target))
          progress.update(1)
        data["self_tuning"].setdefault(name, {})[opt] = {"seeds": seeds}
        _write(files["json"], data)
  progress.close()
  for ruleset in ("external", "self_tuning"):
    data.setdefault("scores", {})[ruleset] = scores_of(data, ruleset)
  if data["external"] or data["self_tuning"]:
    _write(files["json"], data)
  return data


# ---------------------------------------------------------------------------------
# Report


RULESETS = {"external": "External tuning", "self_tuning": "Self-tuning"}


def _cell(t: float, r: float, rows: list[dict]) -> str:
  if rows and all("unsupported" in r for r in rows):
    return "unsupported"
  if not math.isfinite(t):
    return "∞"
  return f"{t:.3g} s ({r:.2f})"


def _runs(data: dict, ruleset: str, w: str, opt: str) -> list[dict]:
  row = data[ruleset].get(w, {}).get(opt)
  if row is None:
    return []
  return ([r for s in row["studies"] for r in s] if ruleset == "external"
          else row["seeds"])


def markdown(data: dict) -> str:
  """Per ruleset: the score and, per workload, time to target (ratio to the fastest);
  then the targets, compile times and the test metric beside the validation one."""
  lines = []
  targets = data.get("targets", {})
  workloads = [w for w in WORKLOADS if w in targets]
  for ruleset, title in RULESETS.items():
    times = times_of(data, ruleset)
    if not times:
      continue
    ratios = performance_ratios(times)
    scores = {opt: score(row.values()) for opt, row in ratios.items()}
    lines += [f"**{title}** — score (∫ρ, r_max = {R_MAX:g}) and time to target in "
              "training seconds (÷ the fastest):", "",
              "| optimiser | score | " + " | ".join(workloads) + " | median compile s |",
              "|---" * (len(workloads) + 3) + "|"]
    for opt in sorted(times, key=lambda o: -scores[o]):
      cells, compiles = [], []
      for w in workloads:
        runs = _runs(data, ruleset, w, opt)
        compiles += [r["compile_seconds"] for r in runs if "compile_seconds" in r]
        cells.append(_cell(times[opt].get(w, math.inf), ratios[opt].get(w, math.inf), runs)
                     if runs else "not run")
      compile_s = f"{statistics.median(compiles):.1f}" if compiles else "—"
      lines.append(f"| {opt} | **{scores[opt]:.3f}** | " + " | ".join(cells)
                   + f" | {compile_s} |")
    lines.append("")
  lines += ["| workload | validation metric | target | max_runtime s | set by |",
            "|---|---|---|---|---|"]
  for w in workloads:
    t = targets[w]
    lines.append(f"| {w} | {t['metric']} | {t['target']:.4g} | {t['max_runtime']:.3g} | "
                 f"{t.get('set_by', '—')} |")
  lines += ["", "Test metric (MNIST test set, never tuned on) at the end of each "
            "self-tuning run, median over seeds, beside the validation metric:", "",
            "| optimiser | " + " | ".join(f"{w} val. / test" for w in workloads
                                         if w != "char_lm") + " |",
            "|---" * (1 + len([w for w in workloads if w != "char_lm"])) + "|"]
  self_tuned = dict.fromkeys(o for rows in data.get("self_tuning", {}).values() for o in rows)
  for opt in self_tuned:
    cells = []
    for w in workloads:
      if w == "char_lm":
        continue
      runs = [r for r in _runs(data, "self_tuning", w, opt) if "unsupported" not in r]
      if not runs:
        cells.append("—")
        continue
      val = [r["final_validation"] for r in runs if r["final_validation"] is not None]
      test = [r["test"] for r in runs if r.get("test") is not None]
      cells.append((f"{statistics.median(val):.4g}" if val else "diverged") + " / "
                   + (f"{statistics.median(test):.4g}" if test else "—"))
    lines.append(f"| {opt} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(data: dict, path: pathlib.Path) -> None:
  """The performance profile ρ(τ) of every optimiser, one panel per ruleset."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
  colours = dict(zip(OPTIMISERS, plt.get_cmap("tab20").colors))
  tau = np.linspace(1.0, R_MAX, 600)
  for ax, (ruleset, title) in zip(axes[0], RULESETS.items()):
    times = times_of(data, ruleset)
    ratios = performance_ratios(times)
    for opt, row in sorted(ratios.items(), key=lambda kv: -score(kv[1].values())):
      ax.step(tau, profile(row.values(), tau), where="post", color=colours.get(opt),
              ls="--" if opt in FIRST_ORDER else "-",
              label=f"{opt} ({score(row.values()):.2f})")
    ax.set(title=f"{title}" + (" — QUICK smoke run" if data["settings"]["quick"] else ""),
           xlabel="τ (time ÷ fastest)", ylabel="ρ(τ): share of workloads",
           xlim=(1, R_MAX), ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, title="optimiser (score)", title_fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


_BEGIN = "<!-- time_to_result: generated by python -m benchmarks.time_to_result --report -->"
_END = "<!-- /time_to_result -->"


def update_readme(data: dict, json_name: str, readme: pathlib.Path = README) -> None:
  """Rewrite the README's block between the time_to_result markers from ``data``."""
  s = data["settings"]
  label = ("**QUICK smoke run (`--quick`): shrunken data, models and budgets, "
           f"{s['studies']} study × {s['trials']} trials, {s['seeds']} seed — not the "
           "benchmark's result.**" if s["quick"] else
           f"{s['studies']} studies × {s['trials']} trials, {s['seeds']} seeds.")
  merged = "; ".join(f"{', '.join(m['workloads'])} ({', '.join(m['rulesets'])})"
                     for m in data.get("merged", []))
  block = (f"{_BEGIN}\n\n{label} On {s['device']} (`{json_name}`"
           + (f"; run in parts joined by `--merge`: {merged}" if merged else "") + "):\n\n"
           + markdown(data) + f"\n{_END}")
  text = readme.read_text()
  if _BEGIN not in text:
    raise ValueError(f"{readme} has no {_BEGIN!r} marker to fill")
  start, end = text.index(_BEGIN), text.index(_END) + len(_END)
  readme.write_text(text[:start] + block + text[end:])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 1/10 of the data, tiny LM, ~1.5 s budgets, "
                           "1 study × 2 trials, 1 seed (< 10 min)")
  parser.add_argument("--workloads", default=",".join(WORKLOADS))
  parser.add_argument("--optimisers", default=",".join(OPTIMISERS),
                      help=f"any of {', '.join(OPTIMISERS)}")
  parser.add_argument("--rulesets", default="targets,external,self_tuning",
                      help="stages to run: targets (only where missing, or --retarget), "
                           "external, self_tuning")
  parser.add_argument("--studies", type=int)
  parser.add_argument("--trials", type=int)
  parser.add_argument("--seeds", type=int)
  parser.add_argument("--target-trials", type=int)
  parser.add_argument("--retarget", action="store_true",
                      help="rerun the target setting of --workloads even if recorded")
  parser.add_argument("--merge", action="store_true",
                      help="replace only the rows run now in the existing JSON")
  parser.add_argument("--report", action="store_true",
                      help="only redraw the PNG and rewrite the README block from the JSON")
  parser.add_argument("--out", help="results path without suffix (default "
                      "benchmarks/results/time_to_result[_quick])")
  args = parser.parse_args(argv)
  defaults = ((1, 2, 1, 2) if args.quick else (3, 5, 3, 8))
  for key, value in zip(("studies", "trials", "seeds", "target_trials"), defaults):
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.out = args.out or str(RESULTS / ("time_to_result_quick" if args.quick
                                        else "time_to_result"))
  files = paths(pathlib.Path(args.out))
  if args.report:
    data = json.loads(files["json"].read_text())
  else:
    start = time.perf_counter()
    data = run(args)
    print(f"wall clock: {time.perf_counter() - start:.0f} s")
  if data.get("external") or data.get("self_tuning"):
    plot(data, files["png"])
    print(markdown(data))
    if args.report:
      update_readme(data, files["json"].name)


if __name__ == "__main__":
  main()
