# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m inference.demo

# Two workers, each taking whole files (module fixtures run once): most of the suite's time is
# XLA compiling, which runs on one core.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" -p no:cacheprovider -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check griffin_jax training inference convert tests
	$(BIN)/ruff format --check griffin_jax training inference convert tests

clean:
	rm -rf $(VENV) build *.egg-info
