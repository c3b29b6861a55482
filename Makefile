# Set-up and the commands the README names. `make search` and `make test` each install first.
PYTHON ?= python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install search smoke test test-slow lint bench bench-full bench-quality bench-chaos bench-scale device-carry

install:  ## the package with its dev tools, and Debian's Fashion-MNIST (real data without a network)
	@if command -v apt-get >/dev/null && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist \
		|| echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST runs and the tests need it"; fi
	$(PYTHON) -m pip install -q -e ".[dev]"

search: install  ## the main job: the MLP on Fashion-MNIST, 50 samples, Optuna + ASHA, 5 minutes at most
	$(PYTHON) search/tune_mlp.py --config experiments/fashion_mlp_asha.yaml --num-samples 50

smoke: install
	$(PYTHON) search/tune_mlp.py --smoke-test --data_class=FashionMNIST

lint:
	ruff check .
	ruff format --check .

test: install lint  ## the default test run (minutes); CI runs it, then test-slow
	$(PYTHON) -m pytest

test-slow: install
	$(PYTHON) -m pytest -m slow --durations=25  # the slowest tests named in the log: CI has 90 minutes in all

bench: install  ## quick benchmark (minutes): prints figures and ratios, writes benchmarks/results/
	$(PYTHON) benchmarks/run.py --quick

bench-full: install  ## the full benchmark: 50-sample searches, ours and the textbook recipe
	$(PYTHON) benchmarks/run.py --full

bench-quality: install  ## float32 vs --precision auto on fashion_mlp_asha: 3 seeds each, 5 minutes a search (about 35 minutes)
	$(PYTHON) benchmarks/quality.py --compare precision --time-budget 300s

bench-chaos: install  ## faults from a seed (killed workers, forks, driver; a node replaced; a truncated checkpoint) on a 2-node cluster; SCHEDULE=long for 100+ faults over 2,200 trials
	$(PYTHON) benchmarks/chaos.py --schedule $(or $(SCHEDULE),short) --seed $(or $(SEED),0)
	$(PYTHON) benchmarks/chaos.py --schedule $(or $(SCHEDULE),short) --seed $(or $(SEED),0) --trial-process fork

bench-scale: install  ## a search of 1,000 tiny trials: seconds per trial at 100, 300, 1,000, driver memory, state, disk
	$(PYTHON) benchmarks/scale.py --trials 1000

device-carry:  ## the GPU check's carry folder .device/: slim Ray for the GPU image's Python 3.12, wheels, data (README)
	$(PYTHON) benchmarks/device/build_carry.py
