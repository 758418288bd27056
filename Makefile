# Set-up and entry points. `make test` and `make demo` work on a fresh machine (Python 3.11, no GPU).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0

.PHONY: install data check test demo lint bench views

# the package and what it runs on (what `make demo` needs), then the test and lint tools on top (`make install`)
$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this version is served from local disk; a newer one is a multi-GB download
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST, the embedded real task (Debian package dataset-fashion-mnist)
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { $$(command -v sudo) apt-get install -y -q dataset-fashion-mnist || \
	    { $$(command -v sudo) apt-get update -q && $$(command -v sudo) apt-get install -y -q dataset-fashion-mnist; }; }

# two pytest workers on two cores, one thread each (tests/conftest.py); a test file runs on one worker, so the
# artifacts of its module-scoped fixtures are made once
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

# day-to-day: lint, import contracts and every test not end to end (a CLI in a subprocess) or fuzz
check: install data
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PYTEST) -m "not e2e and not fuzz"

test: install data
	$(VENV)/bin/lint-imports
	$(PYTEST)

demo: $(VENV)/.runtime data
	$(PY) -m train.pipeline

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

# ratios measured side by side in one run each (a few minutes each on a 2-core machine); never part of `make test`
bench: install data
	$(PY) benchmarks/build.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/kd_step.py
	$(PY) benchmarks/deploy.py

# how many cached views / logits per view are enough (reuses the teacher and store of `make demo`)
views: install data
	$(PY) benchmarks/views.py --run-dir runs/pipeline --views 1,2,8 --topk 1,3,5,10 --lr 0.0005 --out docs
