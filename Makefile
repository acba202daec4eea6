# Development entry points. `make run` and `make test` create (or reuse) .venv with the CPU build of
# torch, install mrl into it, then run the quick-start job or the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mrl-installed
TORCH_CPU := torch==2.13.0

.PHONY: venv run test soak clean-venv

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
