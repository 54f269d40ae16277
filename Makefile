# The two commands of the README: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-fast lint format install clean gpu-check device-wheels

$(BIN)/.installed: requirements.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/wss prepare synthetic --out runs/data/synthetic --n 400 --size 128 --seed 0
	$(BIN)/wss run -c configs/demo.yaml

# The whole suite, after the lint and format checks (ruff, configured in pyproject.toml).
test: lint
	$(BIN)/python -m pytest

# The inner loop: everything but the tests marked slow (over ~10 s each on a CPU).
test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrites the code as `make lint` expects it.
format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# On a machine with a CUDA GPU: the CUDA tests and the benches at GPU settings (bench/gpu_check.sh);
# STEPS=scale runs the whole-pipeline projection (bench/pipeline_scale.py) instead.
gpu-check:
	bash bench/gpu_check.sh $(STEPS)

# The packages a bare Python 3.12 GPU machine lacks, as wheels in the git-ignored .whl/.
device-wheels:
	mkdir -p .whl && cp ../shared/wheels-py312/*.whl .whl/

clean:
	rm -rf runs .pytest_cache
