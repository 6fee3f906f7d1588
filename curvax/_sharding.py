"""Reading an array's explicit sharding (``jax.jit`` over a mesh with Explicit axes)."""

from __future__ import annotations

import jax


def explicit_spec(x: jax.Array) -> tuple:
  """The ``PartitionSpec`` entries in ``x``'s type; empty outside an explicit mesh.

  Auto-sharded and ``shard_map``-local arrays carry no sharding in their type.
  """
  return tuple(getattr(getattr(jax.typeof(x), "sharding", None), "spec", ()))
