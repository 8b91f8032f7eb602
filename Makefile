# exaone_ext: the two commands of the README, and the build checks CI runs.
#   make demo        set up .venv, build and install the package, run the showcase
#   make train-demo  run the demo model's training recipe (about 15 minutes on 2 cores) and replace
#                    the shipped weights in python/exaone_ext/demo_model/weights
#   make test        set up .venv, build and install the package, run the fast complete pass (every
#                    kernel and path; the tests marked slow left out), then cuda-check
#   make test-all    make test, then the slow tests (make test-slow): the whole suite
#   make cuda-check  compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (no torch, no GPU) and
#                    print ptxas's registers and spills of the hot kernels (all: build/cuda-check/ptxas.txt)
#   make cuda-build  build and import the full CUDA extension against torch==2.14.1 (CUDA 13) in .venv-cuda
#   make bench       run the CPU benchmarks (pytest-benchmark)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_CPU ?= torch==2.13.0
TORCH_CUDA ?= torch==2.14.1
CUDA_VENV ?= .venv-cuda
NVCC ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)
CUDA_ARCHS ?= 80 90
DEPS := numpy safetensors tokenizers jinja2 pybind11 scikit-build-core ninja "cmake>=3.26" \
        pytest pytest-benchmark "transformers>=5" hypothesis matplotlib fastapi uvicorn openai httpx gguf

# Imports the CUDA build on a machine without a GPU and checks every op has a CUDA kernel registered
# (but decode_layers: the CPU's one call through all the decoder layers; on a GPU a CUDA graph of the
# decode step does that job).
define CUDA_IMPORT_CHECK
import json, torch, exaone_ext
info = exaone_ext.build_info()
print(json.dumps(info))
assert info["cuda"], "the CUDA kernels are missing from the build"
ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("exaone_ext::")]
missing = [n for n in ops if n != "exaone_ext::decode_layers" and not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert ops and not missing, f"ops without a CUDA kernel: {missing}"
print(f"cuda-build: {len(ops)} ops, each with a CUDA kernel but the CPU-only decode_layers")
endef
export CUDA_IMPORT_CHECK

.PHONY: demo train-demo test test-slow test-all venv install cuda-check cuda-build bench clean

$(VENV)/.deps:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_CPU)"
	$(PIP) install -q $(DEPS)
	@touch $@

venv: $(VENV)/.deps

install: venv
	$(PIP) install -q --no-build-isolation --no-deps .

demo: install
	$(PY) -m exaone_ext.demo

train-demo: install
	$(PY) -m exaone_ext.demo_model.recipe --out python/exaone_ext/demo_model/weights

test: install
	$(PY) -m pytest -q -m "not slow" tests
	@if command -v nvcc >/dev/null 2>&1 || test -x /usr/local/cuda/bin/nvcc; then $(MAKE) --no-print-directory -j$$(nproc) cuda-check; \
	 else echo "nvcc not found: skipping cuda-check"; fi

test-slow: install
	$(PY) -m pytest -q -m slow tests

test-all: test test-slow

# Each .cu alone through nvcc, once per architecture, in parallel (make -j), rebuilt when it or a
# header it may include changes.
CU_SRCS := $(shell find csrc/cuda -name '*.cu' 2>/dev/null | sort)
CU_HDRS := $(shell find csrc/common csrc/cuda -name '*.h' -o -name '*.cuh' 2>/dev/null)
CU_OBJS := $(foreach a,$(CUDA_ARCHS),$(patsubst csrc/%.cu,build/cuda-check/sm_$(a)/%.o,$(CU_SRCS)))
define CU_RULE
build/cuda-check/sm_$(1)/%.o: csrc/%.cu $(CU_HDRS)
	@mkdir -p $$(dir $$@)
	@echo "nvcc sm_$(1) $$<"
	@$(NVCC) -std=c++20 -O3 --expt-relaxed-constexpr -Icsrc -gencode=arch=compute_$(1),code=sm_$(1) -Xptxas -v \
	  -c $$< -o $$@ 2> $$@.ptxas.log || { cat $$@.ptxas.log; rm -f $$@; exit 1; }
endef
$(foreach a,$(CUDA_ARCHS),$(eval $(call CU_RULE,$(a))))

cuda-check: $(CU_OBJS)
	@$(PYTHON) cmake/ptxas_report.py build/cuda-check > build/cuda-check/ptxas.txt; rc=$$?; \
	 grep -E "mma_kernel|resident|SPILLS|ptxas report|held to no|^  " build/cuda-check/ptxas.txt; \
	 echo "(every kernel: build/cuda-check/ptxas.txt)"; exit $$rc
	@echo "cuda-check: all $(words $(CU_SRCS)) .cu files compile for sm $(CUDA_ARCHS)"

cuda-build:
	@test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	@$(CUDA_VENV)/bin/python -c "import torch" 2>/dev/null || $(CUDA_VENV)/bin/pip install -q "$(TORCH_CUDA)"
	$(CUDA_VENV)/bin/pip install -q numpy safetensors tokenizers jinja2 pybind11 scikit-build-core ninja "cmake>=3.26"
	EXAONE_EXT_CUDA=ON $(CUDA_VENV)/bin/pip install -q --no-build-isolation --no-deps --config-settings=build-dir=build/cuda .
	cd /tmp && $(abspath $(CUDA_VENV))/bin/python -c "$$CUDA_IMPORT_CHECK"

bench: install
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,ops -q

clean:
	rm -rf build dist
