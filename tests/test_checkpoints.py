"""Save → restore → continue, for every solver, with orbax and flax.serialization.

A checkpoint holds arrays only; the state's NamedTuple types come from a template (a
fresh ``tx.init(params)``), as documented in docs/guides/checkpoints.md. The reference is the same
solver's uninterrupted run, bit for bit on CPU. The solvers, batches and jitted steps
are those of ``tests/test_reliability.py`` (shared, so each step compiles once).
"""

import functools

import flax.serialization
import jax
import pytest

from tests import test_reliability as rel

STEPS = rel.STEPS


@functools.lru_cache(maxsize=None)
def _runs(name):
  """The uninterrupted run, the state half-way, and the fresh template."""
  tx, step = rel.solver(name)
  params = rel.init_params()
  full = rel.train(step, params, tx.init(params), 0, STEPS)
  middle = rel.train(step, params, tx.init(params), 0, STEPS // 2)
  template = (rel.init_params(), tx.init(rel.init_params()))
  return step, full, middle, template


@pytest.mark.parametrize("name", list(rel.SOLVERS))
def test_flax_serialization_round_trip_continues_the_run(name):
  step, full, middle, template = _runs(name)
  restored = flax.serialization.from_bytes(template, flax.serialization.to_bytes(middle))
  rel.assert_trees_equal(rel.train(step, *restored, STEPS // 2, STEPS), full)


@pytest.mark.parametrize("name", list(rel.SOLVERS))
def test_orbax_checkpoint_restored_with_a_template_continues_the_run(name, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  step, full, middle, template = _runs(name)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "step", middle)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = checkpointer.restore(tmp_path / "step", abstract)
    # Without a template orbax rebuilds plain containers: the state types are lost.
    untyped = checkpointer.restore(tmp_path / "step")
  assert type(restored[1]) is type(template[1]) and not hasattr(untyped[1], "count")
  rel.assert_trees_equal(rel.train(step, *restored, STEPS // 2, STEPS), full)
