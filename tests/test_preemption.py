"""Preemption: ``examples/train_preemptible.py`` killed with SIGKILL and restarted.

The example (Flax, orbax ``CheckpointManager`` every 3 steps with the data position) is
run as a subprocess. Each solver is killed once, with ``SIGKILL``, after a random step
(seeded here; a kill right after a save step lands while orbax is still writing it), the
command is rerun until it exits normally, and every solver's final parameters and
optimiser state (its sampling key's count, periodic counters, pair stores, Polyak's
average: every leaf) must equal an uninterrupted run's bit for bit. A latest checkpoint
that is truncated or half-written must be reported and the previous one used.

The subprocesses share a persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``) so
each solver's step compiles once across the runs; a cached executable is the same
program, so it cannot hide a difference.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_preemptible.py"
SOLVERS = ("curveball", "hessian_free", "sqn", "lsr1", "kfac", "kflr", "kfra", "ekfac",
           "soap")
STEPS, EVERY = 8, 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  # Not conftest.py's eight host devices: one is what the example uses.
  xla_flags = os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "")
  return {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "TF_CPP_MIN_LOG_LEVEL": "3", "OPENBLAS_NUM_THREADS": "1"}


def run(directory, env, *extra, solvers=SOLVERS):
  return subprocess.run(
      [sys.executable, str(SCRIPT), "--checkpoint-dir", str(directory),
       "--solver", ",".join(solvers), "--steps", str(STEPS), "--every", str(EVERY),
       *extra], env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """Every solver's uninterrupted run."""
  directory = tmp_path_factory.mktemp("uninterrupted")
  result = run(directory, env)
  assert result.returncode == 0, result.stderr[-3000:]
  return directory


def assert_same_bits(directory, reference_dir, solver):
  with np.load(directory / solver / "final.npz") as got, \
       np.load(reference_dir / solver / "final.npz") as want:
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
      assert got[key].dtype == want[key].dtype, (solver, key)
      # Bytes, not values: NaN fields (a ratio before its first step) compare too.
      assert got[key].tobytes() == want[key].tobytes(), (solver, key)


def test_killed_runs_resume_to_the_uninterrupted_runs_bits(tmp_path, env, reference):
  rng = np.random.default_rng(23)
  kill_at = {solver: int(rng.integers(1, STEPS)) for solver in SOLVERS}
  spec = ",".join(f"{solver}={step}" for solver, step in kill_at.items())
  killed, log = [], ""
  for _ in range(len(SOLVERS) + 1):
    result = run(tmp_path, env, "--kill-at", spec)
    log += result.stdout
    if result.returncode == 0:
      break
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    killed.append(result.stdout.strip().splitlines()[-1])
  assert result.returncode == 0, log
  assert len(killed) == len(SOLVERS), killed
  for solver, step in kill_at.items():
    assert f"{solver}: killing this process after step {step}" in log
    # Resumed from a checkpoint at or before the kill, or from scratch: the latest
    # may still have been being written (asynchronously) when the kill came.
    resumed = [int(line.split()[-4]) for line in log.splitlines()
               if line.startswith(f"{solver}: resumed at step")]
    assert len(resumed) <= 1 and all(r % EVERY == 0 and 0 < r <= step for r in resumed), (
        solver, step, resumed)
  for solver in SOLVERS:
    assert_same_bits(tmp_path, reference, solver)


# One damage per solver, both repaired by one rerun (a subprocess each cost ~25-50 s).
DAMAGED = {"kfac": "truncated", "kflr": "half-written"}


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, env,
                                                                     reference):
  latest_step = STEPS // EVERY * EVERY
  for solver, damage in DAMAGED.items():
    shutil.copytree(reference / solver, tmp_path / solver)
    (tmp_path / solver / "final.npz").unlink()
    state_dir = tmp_path / solver / "checkpoints" / str(latest_step) / "train_state"
    if damage == "truncated":
      # The array data: every file under d/ cut to half its length.
      data_files = [p for p in state_dir.rglob("*")
                    if p.is_file() and p.parent.name == "d"]
      assert data_files
      for path in data_files:
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
      # Killed mid-write on a filesystem without atomic renames: the array index missing.
      (state_dir / "manifest.ocdbt").unlink()
  result = run(tmp_path, env, solvers=tuple(DAMAGED))
  assert result.returncode == 0, result.stderr[-3000:]
  previous = latest_step - EVERY
  for solver, damage in DAMAGED.items():
    # Each warning names the solver's checkpoint directory (its error may span lines).
    warnings = [w for w in result.stderr.split("WARNING: ")
                if f"{os.sep}{solver}{os.sep}checkpoints" in w]
    assert any(w.startswith(f"the checkpoint at step {latest_step} in")
               and f"falling back to step {previous}" in w for w in warnings), (
                   damage, result.stderr[-3000:])
    assert f"{solver}: resumed at step {previous}" in result.stdout, damage
    assert_same_bits(tmp_path, reference, solver)
