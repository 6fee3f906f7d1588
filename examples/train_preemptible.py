"""A preemptible training loop: Flax, a curvax solver, orbax ``CheckpointManager``.

    python examples/train_preemptible.py --checkpoint-dir DIR \\
        [--solver kfac,sqn,...] [--steps 12] [--every 3] [--seed 0] [--kill-at 7]

Trains a tiny Flax linen tanh MLP on a synthetic classification set, once per solver
named (each in ``DIR/<solver>/``), with ``curvax.polyak`` chained after the solver. Every
``--every`` steps an orbax ``CheckpointManager`` saves (asynchronously) the parameters,
the whole optimiser state, and the data stream's position. Run the same command again
after the process dies — however it dies, ``SIGKILL`` included — and each solver resumes
from its latest checkpoint and ends with exactly the parameters and state of a run never
interrupted, bit for bit:

* the data order is a function of ``(seed, position)`` only (one permutation of the set
  per epoch, drawn from ``(seed, epoch)``), and the position is in the checkpoint;
* every random number a solver draws (KFAC's sampled targets, Hessian-free's probes) is
  its seed folded with the step count kept in its state; every periodic rule (EKFAC's
  and SOAP's basis refreshes included) runs on that count; quasi-Newton pair stores,
  eigenbases and Polyak's average are state arrays.

A latest checkpoint that cannot be restored (truncated, half-written, a file missing) is
reported on stderr with its step and the error, deleted, and the previous one used; a
step being written when the process died (an orbax temporary directory) is never listed.

A solver whose run has finished writes ``DIR/<solver>/final.npz`` (every parameter and
state leaf, by tree path, and the data position) and is skipped on a rerun.
``--kill-at N`` (testing) sends this process ``SIGKILL`` right after step ``N`` (after
that step's checkpoint save has started) once per solver (a ``DIR/<solver>/killed``
marker says it was done); ``--kill-at kfac=5,sqn=2`` gives a step per solver.
``tests/test_preemption.py`` kills and restarts it and compares with an uninterrupted
run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

# Run as a script, import this checkout's curvax.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import curvax  # pylint: disable=wrong-import-position

LOSS = "softmax_cross_entropy"
NUM_EXAMPLES, FEATURES, CLASSES, BATCH = 50, 5, 3, 8

# Small periods so that every periodic rule fires, and crosses checkpoints, in a few steps.
SOLVERS = {
    "curveball": lambda: curvax.curveball(LOSS, damping_period=2),
    "hessian_free": lambda: curvax.hessian_free(LOSS, max_cg_iters=5, min_cg_iters=2),
    "sqn": lambda: curvax.sqn(LOSS, learning_rate=0.5, memory=3, pair_period=2),
    "lsr1": lambda: curvax.lsr1(LOSS, learning_rate=0.1, memory=3, pair_period=2),
    "kfac": lambda: curvax.kfac(LOSS, inverse_period=2, tau_period=3, gamma_period=4),
    "kflr": lambda: curvax.kflr(LOSS, inverse_period=2, tau_period=3, gamma_period=4),
    "kfra": lambda: curvax.kfra(LOSS, activations=jnp.tanh, inverse_period=2),
    "ekfac": lambda: curvax.ekfac(LOSS, inverse_period=2, tau_period=3, gamma_period=4),
    # Gradients in: SOAP is a first-order transformation (its own count, its bases).
    "soap": lambda: curvax.soap(learning_rate=0.01, precondition_frequency=2),
}
FIRST_ORDER = ("soap",)


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(jnp.tanh(nn.Dense(8)(x)))


def optimiser(solver: str) -> optax.GradientTransformation:
  # Polyak last: it averages the parameters after the solver's step.
  return optax.chain(SOLVERS[solver](), curvax.polyak())


class Stream:
  """The training stream: epoch after epoch of the set, each in its own shuffled order.

  The order is a function of ``(seed, position)`` alone, so a restarted run that
  restores ``position`` reads exactly the batches an uninterrupted one would.
  """

  def __init__(self, seed: int):
    rng = np.random.default_rng(seed)
    self.x = rng.standard_normal((NUM_EXAMPLES, FEATURES)).astype(np.float32)
    teacher = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    self.y = np.argmax(self.x @ teacher, axis=-1).astype(np.int32)
    self.seed = seed
    self.position = 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(NUM_EXAMPLES)

  def next_batch(self):
    positions = np.arange(self.position, self.position + BATCH)
    epochs = positions // NUM_EXAMPLES
    index = np.empty(BATCH, np.int64)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      index[here] = self._order(int(epoch))[positions[here] % NUM_EXAMPLES]
    self.position += BATCH
    return jnp.asarray(self.x[index]), jnp.asarray(self.y[index])


def make_step(model: nn.Module, tx: optax.GradientTransformation, first_order: bool):
  loss = curvax.losses.get(LOSS)

  @jax.jit
  def step(params, opt_state, x, y):
    predict = lambda p: model.apply(p, x)
    # A curvax solver takes the gradient from its own linearisation (updates=None).
    grads = jax.grad(lambda p: loss.value(predict(p), y))(params) if first_order else None
    updates, opt_state = tx.update(grads, opt_state, params, predict_fn=predict, targets=y)
    return optax.apply_updates(params, updates), opt_state
  return step


def restore_latest(manager: ocp.CheckpointManager, template: dict):
  """``(step, train_state, data)`` from the newest checkpoint that restores, else ``None``.

  A checkpoint that fails to restore is reported, deleted (so the run can save that step
  again) and the next older one tried. The template gives the state's NamedTuple types
  back (orbax alone would rebuild dicts and lists).
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          train_state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      data = dict(restored.data)
      if data.get("step") != step:
        raise ValueError(f"its data record says step {data.get('step')}")
      return step, restored.train_state, data
    except Exception as error:  # pylint: disable=broad-except
      # Any failure (a truncated array file, missing metadata, a bad record) means
      # the same thing: this checkpoint is unusable and an older one may not be.
      older = [s for s in manager.all_steps() if s < step]
      fallback = f"falling back to step {max(older)}" if older else "starting from scratch"
      print(f"WARNING: the checkpoint at step {step} in {manager.directory} could not be "
            f"restored ({type(error).__name__}: {str(error)[:300]}); deleting it and "
            f"{fallback}.", file=sys.stderr, flush=True)
      manager.delete(step)
  return None


def flat(tree) -> dict:
  """Every leaf of ``tree`` as a NumPy array, keyed by its tree path."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def train(solver: str, directory: pathlib.Path, *, steps: int, every: int, seed: int,
          kill_at: int | None = None) -> None:
  final = directory / "final.npz"
  if final.exists():
    print(f"{solver}: finished already ({final})", flush=True)
    return
  model, tx = MLP(), optimiser(solver)
  stream = Stream(seed)
  params = model.init(jax.random.PRNGKey(seed), stream.x[:1])
  train_state = {"params": params, "opt_state": tx.init(params)}
  options = ocp.CheckpointManagerOptions(max_to_keep=3, cleanup_tmp_directories=True)
  with ocp.CheckpointManager(directory.resolve() / "checkpoints", options=options,
                             item_names=("train_state", "data")) as manager:
    first = 0
    restored = restore_latest(manager, train_state)
    if restored is not None:
      first, train_state, data = restored
      stream.position = data["position"]
      print(f"{solver}: resumed at step {first} (data position {stream.position})",
            flush=True)
    killed_marker = directory / "killed"
    if killed_marker.exists():
      kill_at = None  # killed once already: the rerun must finish
    step = make_step(model, tx, solver in FIRST_ORDER)
    params, opt_state = train_state["params"], train_state["opt_state"]
    for i in range(first, steps):
      params, opt_state = step(params, opt_state, *stream.next_batch())
      # Asked explicitly: left to decide, orbax also saves the first step it is given.
      if (i + 1) % every == 0:
        manager.save(i + 1, args=ocp.args.Composite(
            train_state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            data=ocp.args.JsonSave({"step": i + 1, "position": stream.position,
                                    "seed": seed})))
      if kill_at == i + 1:
        killed_marker.touch()
        print(f"{solver}: killing this process after step {i + 1}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    manager.wait_until_finished()
  arrays = flat({"params": params, "opt_state": opt_state})
  arrays["position"] = np.asarray(stream.position)
  # Written under another name and renamed: a kill mid-write leaves no final.npz.
  partial = directory / "final.partial.npz"
  np.savez(partial, **arrays)
  os.replace(partial, final)
  averaged = curvax.averaged_params(opt_state)
  x, y = stream.x, stream.y
  accuracy = float(jnp.mean(jnp.argmax(model.apply(averaged, x), -1) == y))
  print(f"{solver}: done, {steps} steps, accuracy of the averaged parameters on the "
        f"training set {accuracy:.2f}", flush=True)


def parse_kill_at(text: str | None, solvers: list[str]) -> dict:
  if not text:
    return {}
  if "=" not in text:
    return dict.fromkeys(solvers, int(text))
  pairs = (item.split("=") for item in text.split(","))
  return {name: int(value) for name, value in pairs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--solver", default=",".join(SOLVERS),
                      help=f"comma-separated, from {', '.join(SOLVERS)}")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--checkpoint-dir", required=True, type=pathlib.Path)
  parser.add_argument("--every", type=int, default=3, help="checkpoint period in steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kill-at", default=None,
                      help="testing: SIGKILL this process after this step (N, or "
                           "solver=N,...), once per solver")
  args = parser.parse_args()
  solvers = args.solver.split(",")
  unknown = sorted(set(solvers) - set(SOLVERS))
  if unknown:
    parser.error(f"unknown solver(s) {unknown}; choose from {list(SOLVERS)}")
  kill_at = parse_kill_at(args.kill_at, solvers)
  for solver in solvers:
    directory = args.checkpoint_dir / solver
    directory.mkdir(parents=True, exist_ok=True)
    train(solver, directory, steps=args.steps, every=args.every, seed=args.seed,
          kill_at=kill_at.get(solver))


if __name__ == "__main__":
  main()
