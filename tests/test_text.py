"""The standard-library text corpus against the files on disk."""

import sysconfig
import zlib

import jax
import numpy as np
import pytest

from curvax.problems import text


@pytest.fixture(scope="module")
def corpus():
  return text.load_stdlib()


def test_corpus_is_the_stdlib_files_bytes_split_by_file(corpus):
  root = sysconfig.get_paths()["stdlib"]
  files = text.stdlib_files()
  names = [p.name for p in files]
  assert names == sorted(names) and "os.py" in names and "__init__.py" not in names
  # Every file in exactly one split; the split is the file name's CRC-32, nothing else.
  assert not set(corpus.train_files) & set(corpus.validation_files)
  assert sorted(corpus.train_files + corpus.validation_files) == names
  held_out = [n for n in names if zlib.crc32(n.encode()) < 0.1 * 2**32]
  assert list(corpus.validation_files) == held_out
  for split, files_in in ((corpus.train, corpus.train_files),
                          (corpus.validation, corpus.validation_files)):
    expected = b"".join((files[0].parent / n).read_bytes() for n in files_in)
    assert bytes(np.asarray(split)) == expected
  assert str(files[0].parent) == root and corpus.vocab_size == 256


def test_windows_are_substrings_with_targets_shifted_by_one(corpus):
  tokens = np.asarray(corpus.validation)
  inputs, targets = text.windows(corpus.validation, jax.random.PRNGKey(0), 5, 16)
  assert inputs.shape == targets.shape == (5, 16) and inputs.dtype == np.int32
  haystack = tokens.tobytes()
  for x, y in zip(np.asarray(inputs), np.asarray(targets)):
    np.testing.assert_array_equal(x[1:], y[:-1])
    sequence = np.concatenate([x, y[-1:]]).astype(np.uint8).tobytes()
    assert sequence in haystack
  again = text.windows(corpus.validation, jax.random.PRNGKey(0), 5, 16)
  other = text.windows(corpus.validation, jax.random.PRNGKey(1), 5, 16)
  np.testing.assert_array_equal(inputs, again[0])
  assert not np.array_equal(inputs, other[0])


def test_split_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="no \\*.py files"):
    text.load_stdlib(root=str(tmp_path))
  (tmp_path / "a.py").write_text("x = 1\n")
  with pytest.raises(ValueError, match="leaves a split empty"):
    text.load_stdlib(root=str(tmp_path))
  with pytest.raises(ValueError, match="validation_fraction"):
    text.load_stdlib(validation_fraction=1.0)
