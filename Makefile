# The two commands of the README: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test install clean

$(BIN)/.installed: requirements.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/wss prepare synthetic --out runs/data/synthetic --n 400 --size 128 --seed 0
	$(BIN)/wss run -c configs/demo.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache
