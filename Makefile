# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m inference.demo

# Byte-compiled once above, in parallel: where PYTHONDONTWRITEBYTECODE is set (as on the
# machines this project is built on) every process would otherwise compile the sources of jax,
# torch and transformers it imports, again (4.5 s of 9 here): each test worker, and each CLI,
# server and multi-device check the tests start.
#
# Three workers on two cores, each taking whole files (module fixtures run once): most of the
# suite's time is XLA compiling, which runs on one core, and with two workers a core idled
# while a test waited on a subprocess (measured here: 547-581 s with two workers, 507 with
# three, both cores busy).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" -p no:cacheprovider -n 3 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check griffin_jax training inference convert tests
	$(BIN)/ruff format --check griffin_jax training inference convert tests

clean:
	rm -rf $(VENV) build *.egg-info
