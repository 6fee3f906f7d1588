"""Every curvax solver trained across processes with ``jax.distributed``.

On one machine (the processes talk over 127.0.0.1; CPU collectives by gloo)::

    python examples/multihost.py --num-processes 2 [--local-devices 4] [--out DIR]

launches ``--num-processes`` workers with ``--local-devices`` forced host CPU devices
each. On N real hosts start one worker per host instead::

    python examples/multihost.py --worker --out DIR \\
        [--coordinator HOST:PORT --num-processes N --process-id I]

(without the three bracketed flags ``jax.distributed.initialize()`` finds them itself on
Cloud TPU and under SLURM; elsewhere set them, or ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``).

Each worker builds one global mesh over every process's devices, generates the same
global batches and hands JAX only its own rows
(``jax.make_array_from_process_local_data``), and trains each solver for a few steps
under ``jax.jit`` on a tiny tanh MLP: the program is the global one, XLA's partitioner
inserts the cross-process all-reduces, and no ``axis_name`` is needed. Each worker
writes ``DIR/process{I}.npz`` (every solver's final parameters, state and loss, as seen
by that process), and all together write the orbax checkpoint ``DIR/checkpoint_{solver}``
of the parameters and state one step before the end, for a single-process run to
restore and continue (``tests/test_multihost.py`` checks both).
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import socket
import subprocess
import sys
import time

# Run as a script, import this checkout's curvax.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import curvax  # noqa: E402

LOSS = "softmax_cross_entropy"
BATCH = 16  # global batch: 2 rows per device on 2 processes x 4 devices
STEPS = 3
AXIS = "data"

SOLVERS = {
    "curveball": lambda: curvax.curveball(LOSS, damping=1.0, damping_period=2),
    "hessian_free": lambda: curvax.hessian_free(LOSS, max_cg_iters=4, min_cg_iters=2),
    "sqn": lambda: curvax.sqn(LOSS, learning_rate=0.5, memory=3, pair_period=1),
    "lsr1": lambda: curvax.lsr1(LOSS, learning_rate=0.5, memory=3),
    "kfac": lambda: curvax.kfac(LOSS, tau_period=1, gamma_period=2),
    "kflr": lambda: curvax.kflr(LOSS, momentum=True, tau_period=1, gamma_period=2),
    "kfra": lambda: curvax.kfra(LOSS, activations=jnp.tanh, tau_period=1),
}
# L-SR1's third step here inverts a nearly singular pair, where float32 rounding of
# different reduction orders grows past 1e-5 (on one process alike): two steps.
NUM_STEPS = {"lsr1": 2}


def init_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  # float32, not weak-typed: the step's outputs are strongly typed, so a weak-typed
  # leaf would compile the step a second time.
  return {"w1": jax.random.normal(k1, (4, 6)) / 2, "b1": jnp.full((6,), 0.1, jnp.float32),
          "w2": jax.random.normal(k2, (6, 3)) / 2}


def global_batches():
  """``(STEPS, BATCH, 4)`` inputs and ``(STEPS, BATCH)`` labels, the same everywhere."""
  rng = np.random.default_rng(5)
  return (rng.standard_normal((STEPS, BATCH, 4), np.float32),
          rng.integers(0, 3, (STEPS, BATCH), np.int32))


def mlp(params, x):
  # Tagged layers for the Kronecker family; plain matrix products for the rest.
  hidden = jnp.tanh(curvax.kron.dense(x, params["w1"], params["b1"]))
  return curvax.kron.dense(hidden, params["w2"])


@functools.lru_cache(maxsize=None)
def solver(name):
  """``(tx, jitted step)`` of solver ``name``, built once per process."""
  tx = SOLVERS[name]()
  return tx, make_step(tx)


def make_step(tx):
  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(None, state, params, predict_fn=lambda p: mlp(p, x),
                               targets=y)
    return jax.tree.map(jnp.add, params, updates), state
  return step


def train(name, place_batch=lambda a: a, replicated=None, on_middle=None):
  """Trains solver ``name``; ``on_middle(params, state)`` sees the step-before-last.

  ``replicated``: sharding of the parameters and state (``None``: one device).
  """
  tx, step = solver(name)
  params, state = init_params(), tx.init(init_params())
  if replicated is not None:
    # Not jax.device_put: across processes it first checks that every process passes
    # equal values, and the NaN placeholders of a fresh state (its ``loss``) never do.
    params, state = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, replicated,
                                               lambda index: np.asarray(a)[index]),
        (params, state))
  xs, ys = global_batches()
  steps = NUM_STEPS.get(name, STEPS)
  for i in range(steps):
    if i == steps - 1 and on_middle is not None:
      on_middle(params, state)
    params, state = step(params, state, place_batch(xs[i]), place_batch(ys[i]))
  return params, state


def flatten(tree, prefix=""):
  """``{prefix/keypath: leaf}`` for ``np.savez``."""
  return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def worker(out: pathlib.Path, coordinator=None, num_processes=None, process_id=None,
           cpu_collectives=None):
  """One process: trains every solver on its rows of each global batch.

  Args:
    out: folder for ``process{I}.npz`` and the orbax checkpoints (shared by all).
    coordinator, num_processes, process_id: for ``jax.distributed.initialize``;
      ``None``: auto-detected (Cloud TPU, SLURM) or from ``JAX_*`` variables.
    cpu_collectives: e.g. ``"gloo"``, for processes whose devices are CPUs.
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator, num_processes, process_id)
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
  rows = BATCH // jax.process_count()
  first = jax.process_index() * rows  # this process's rows of every global batch

  def place_batch(global_array):
    local = global_array[first:first + rows]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local,
                                                  global_array.shape)

  results = {}
  for name in SOLVERS:
    def save_checkpoint(params, state, name=name):
      # Every process calls save with the global arrays; orbax writes each array once.
      import orbax.checkpoint as ocp  # a dev dependency: only this example needs it
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out.absolute() / f"checkpoint_{name}", (params, state),
                          force=True)
        checkpointer.wait_until_finished()

    # The mesh in context: jax.make_mesh's axes are Explicit, and Hessian-free's CG
    # under Explicit axes needs it (without it, its saved-iterate buffer and its
    # iterates disagree on sharding at trace time).
    with jax.set_mesh(mesh):
      params, state = train(name, place_batch, NamedSharding(mesh, P()), save_checkpoint)
    # Replicated outputs: this process's copy, read without any communication.
    local = jax.tree.map(lambda a: a.addressable_data(0), (params, state))
    results.update(flatten(local, name))
  np.savez(out / f"process{jax.process_index()}.npz", **results)
  jax.distributed.shutdown()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(num_processes: int, out, local_devices: int = 4, timeout: float = 300.0):
  """Runs the workers on 127.0.0.1; every worker is killed if one fails or time runs out.

  Args:
    num_processes: worker processes, coordinated over a free port chosen now.
    out: their output folder; each worker's log goes to ``out/process{I}.log``.
    local_devices: host CPU devices forced in each worker.
    timeout: seconds before every worker is killed.

  Raises:
    RuntimeError: a worker failed (its output included) or ``timeout`` seconds passed.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(
      flags + [f"--xla_force_host_platform_device_count={local_devices}"])}
  coordinator = f"127.0.0.1:{free_port()}"
  logs = [out / f"process{i}.log" for i in range(num_processes)]
  procs = []
  try:
    for i in range(num_processes):
      with open(logs[i], "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--out", str(out), "--coordinator",
             coordinator, "--num-processes", str(num_processes), "--process-id", str(i),
             "--cpu-collectives", "gloo"], env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        raise RuntimeError(
            (f"worker {failed[0]} failed" if failed else f"timed out after {timeout} s")
            + ":\n" + "\n".join(f"--- process {i}\n" + logs[i].read_text()[-3000:]
                                for i in range(num_processes)))
      time.sleep(0.1)
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
      raise RuntimeError(f"worker {failed[0]} failed:\n" + logs[failed[0]].read_text())
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--local-devices", type=int, default=4)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("multihost_out"))
  parser.add_argument("--timeout", type=float, default=300.0)
  parser.add_argument("--worker", action="store_true", help="run one worker (one host)")
  parser.add_argument("--coordinator", help="HOST:PORT of process 0 (workers)")
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--cpu-collectives", help='e.g. "gloo" for CPU-only workers')
  args = parser.parse_args()
  if args.worker:
    args.out.mkdir(parents=True, exist_ok=True)
    worker(args.out, args.coordinator, args.num_processes, args.process_id,
           args.cpu_collectives)
  else:
    launch(args.num_processes or 2, args.out, args.local_devices, args.timeout)
    print(f"wrote {args.out}/process*.npz and {args.out}/checkpoint_*/")


if __name__ == "__main__":
  main()
