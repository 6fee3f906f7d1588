"""Real text that is on every machine that runs Python: the standard library's source.

The corpus is the top-level ``*.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``; no packages, hence no ``site-packages`` or test
suites), read as bytes in sorted file-name order: a byte-level vocabulary of 256 tokens
that needs no tokenizer and never meets an unknown symbol. Files, not windows, are split
between training and validation (by a CRC-32 of the file name, the same on every machine
and every run), so validation measures text from modules the model never saw.
"""

from __future__ import annotations

import pathlib
import sysconfig
import zlib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

VOCAB_SIZE = 256  # bytes


class Corpus(NamedTuple):
  """Bytes of the training and validation files, each split concatenated in file order.

  Attributes:
    train, validation: ``uint8`` token arrays.
    train_files, validation_files: the file names (relative to the library) of each split.
    vocab_size: 256.
  """
  train: jax.Array
  validation: jax.Array
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]
  vocab_size: int = VOCAB_SIZE


def stdlib_files(root: Optional[str] = None) -> list[pathlib.Path]:
  """The top-level ``*.py`` files of the standard library (or of ``root``), sorted."""
  root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.glob("*.py") if p.is_file())
  if not files:
    raise FileNotFoundError(f"no *.py files in {root}: is this Python's standard library?")
  return files


def is_validation_file(name: str, validation_fraction: float) -> bool:
  """Whether file ``name`` is held out: its CRC-32 falls in the first ``fraction`` of the
  range (``hash()`` is salted per process; CRC-32 is the same everywhere)."""
  return zlib.crc32(name.encode()) < validation_fraction * 2**32


def load_stdlib(*, validation_fraction: float = 0.1, root: Optional[str] = None) -> Corpus:
  """The standard library's source as a byte-level corpus, split by file.

  Args:
    validation_fraction: the expected share of files held out for validation.
    root: read this folder's top-level ``*.py`` files instead of the standard library.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
  splits = {False: [], True: []}
  for path in stdlib_files(root):
    splits[is_validation_file(path.name, validation_fraction)].append(path)
  if not splits[True] or not splits[False]:
    raise ValueError(f"validation_fraction={validation_fraction} leaves a split empty")
  tokens = lambda paths: jnp.asarray(
      np.frombuffer(b"".join(p.read_bytes() for p in paths), dtype=np.uint8))
  names = lambda paths: tuple(p.name for p in paths)
  return Corpus(tokens(splits[False]), tokens(splits[True]), names(splits[False]),
                names(splits[True]))


def windows(tokens: jax.Array, key: jax.Array, batch_size: int,
            context: int) -> tuple[jax.Array, jax.Array]:
  """``batch_size`` random windows of ``tokens``: inputs and next-token targets.

  Returns ``(inputs, targets)``, both ``int32`` of shape ``(batch_size, context)``, with
  ``targets[:, i] = inputs[:, i + 1]`` continued by the token after the window. Jittable.
  """
  starts = jax.random.randint(key, (batch_size, 1), 0, tokens.shape[0] - context)
  sequence = tokens[starts + jnp.arange(context + 1)].astype(jnp.int32)
  return sequence[:, :-1], sequence[:, 1:]
