"""Two processes × 4 host devices (``jax.distributed`` on 127.0.0.1, gloo collectives)
train every solver as one process does on the global batch.

One pair of workers (``examples/multihost.py``, launched once for the module, killed
on failure or after ``TIMEOUT`` seconds) trains each solver under ``jax.jit`` with every
batch split across the processes. The reference is the same solver's single-device run
on the global batch, in this process. Compared, on each process: the parameters and the
whole solver state, including ``state.loss`` (the loss logged is the global batch's,
not the process's) and KFAC's Monte-Carlo factors — under ``jax.jit`` the step is the
global program, so KFAC draws one key for the global batch and, with JAX's partitionable
threefry (the default), each example's sample does not depend on how the batch is split.
The orbax checkpoint the processes write together one step before the end restores
here (with a single-device template) and continues to the same result.
"""

import concurrent.futures
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "multihost.py"
_spec = importlib.util.spec_from_file_location("multihost", _PATH)
mh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mh)

NUM_PROCESSES = 2
TIMEOUT = 300.0  # seconds; about 20 s of CPU per worker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The workers' output folder and every reference, computed while the workers run."""
  out = tmp_path_factory.mktemp("multihost")
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    workers = pool.submit(mh.launch, NUM_PROCESSES, out, local_devices=4, timeout=TIMEOUT)
    references = {name: _reference(name) for name in mh.SOLVERS}
    workers.result()
  return out, references


def _assert_close(got, expected):
  """Every leaf equal to 1e-5 of its scale (its largest entry, at least 1): float32
  rounding of a different reduction order, through a few steps of KFAC's γ rule, moves
  parameters of size 1 by ~1e-6."""
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    e = np.asarray(e, np.float64)
    scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
    np.testing.assert_allclose(np.asarray(g, np.float64), e, rtol=1e-5, atol=1e-5 * scale)


def _unflatten(template, arrays, prefix=""):
  """Inverse of ``mh.flatten``: the leaves of ``template`` read from ``arrays``."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  return jax.tree.unflatten(
      treedef, [arrays[prefix + jax.tree_util.keystr(path)] for path, _ in paths])


def _reference(name):
  """The single-process global-batch run: final and step-before-last (params, state)."""
  middle = []
  final = mh.train(name, on_middle=lambda *tree: middle.append(tree))
  return final, middle[0]


@pytest.mark.parametrize("name", list(mh.SOLVERS))
def test_every_process_and_a_restored_checkpoint_match_the_single_process_run(
    name, runs):
  outputs, references = runs
  final, middle = references[name]
  for process in range(NUM_PROCESSES):
    with np.load(outputs / f"process{process}.npz") as arrays:
      got = _unflatten(final, arrays, name)
    assert np.isfinite(got[1].loss)
    _assert_close(got, final)

  ocp = pytest.importorskip("orbax.checkpoint")
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(outputs / f"checkpoint_{name}",
                                    jax.tree.map(ocp.utils.to_shape_dtype_struct, middle))
  assert type(restored[1]) is type(middle[1])
  _assert_close(restored, middle)
  _, step = mh.solver(name)
  xs, ys = mh.global_batches()
  last = mh.NUM_STEPS.get(name, mh.STEPS) - 1
  # Host copies: arguments placed like the reference run's, so the step compiles once.
  restored = jax.tree.map(np.asarray, restored)
  _assert_close(step(*restored, xs[last], ys[last]), final)
