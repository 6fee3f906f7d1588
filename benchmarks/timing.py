"""Side-by-side timing: interleaved repeats of jitted callables, reported as ratios.

The machine is noisy, so candidates are timed in alternation (round-robin) within one
process and compared by the median; absolute times are never the result.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Mapping

import jax


def block(tree):
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready")
                      else x, tree)


def median_times(fns: Mapping[str, Callable[[], object]], *, repeats: int = 30,
                 warmup: int = 3) -> dict[str, float]:
  """Median wall time of each zero-argument callable, timed round-robin."""
  for fn in fns.values():
    for _ in range(warmup):
      block(fn())
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      block(fn())
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in samples.items()}


def report_ratios(times: Mapping[str, float], baseline: str, **extra) -> list[dict]:
  """Print one JSON line per entry with ``ratio = time / time[baseline]``."""
  rows = []
  for name, t in times.items():
    if name == baseline:
      continue
    row = {"name": name, "ratio": round(t / times[baseline], 3), **extra}
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows
