# The two commands of the README: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

# pip (not uv/poetry) takes torch 2.14.1 / torchvision 0.29.1 from this machine's local disk.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded default: generated data -> shards -> CCNet R=2 and R=0 with local Ray ->
# multi-scale test -> MLflow on runs/mlflow.db. Then the attention modules' efficiency table.
demo: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m jobs.quickstart
	$(BIN)/ccnet efficiency --repeats 1

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/attention_efficiency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
