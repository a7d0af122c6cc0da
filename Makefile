# Two commands do all set-up on a fresh machine:
#   make demo   -> create .venv, install fewstep and its dependencies, run `fewstep demo`
#   make test   -> the same set-up, then the whole (fast) test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pin that installs from local wheels on the dev/CI machines (see README "Install")
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-slow bench bench-digits clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[eval,test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/fewstep demo

# one pytest worker per core (pytest-xdist; at most 4), one thread each (tests/conftest.py)
test: venv
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python tools/benchmark.py

bench-digits: venv
	$(BIN)/python -m pytest -q -s -m slow tests/test_digits.py

clean:
	rm -rf $(VENV) build *.egg-info
