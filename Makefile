# Set-up and main commands. Everything goes into the virtual environment $(VENV).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# extra arguments for the demo, e.g. make demo DEMO_ARGS="-dim 3 -replicates 2"
DEMO_ARGS ?=
# extra arguments for pytest, e.g. make test PYTEST_ARGS="-k networks"; PYTEST_ARGS="-m 'slow and not min_versions'"
# runs the slow end-to-end checks, PYTEST_ARGS="-m min_versions" the wheel test with every dependency at its minimum
# version (CI runs all three)
PYTEST_ARGS ?=

.PHONY: install demo test clean

install: $(VENV)/.installed

# torch 2.14.1 / torchvision 0.29.1 are the releases nnunetv2's dependencies resolve to here
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/nnUNetv2_dmoe_demo $(DEMO_ARGS)

test: install
	$(BIN)/pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) demo_output
