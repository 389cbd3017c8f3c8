# Two commands for a new user: `make demo` and `make test`. Both set up what is missing first:
# the virtualenv with the Python dependencies, and Debian's Fashion-MNIST package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cadis-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
# The embedded pair is committed (models/fashion-mnist, its files' sha256 in its manifest);
# `make pretrain` makes another beside it, the way a reader re-makes one.
PRETRAINED := models/fashion-mnist-retrained
# The demo: the default sweep cut to fit ten minutes on two cores (6 trials of 2 epochs, no
# race, 50 test images; the rest as sweeps/default.yaml has it: docs/performance.md, make demo),
# in its own results folder and MLflow experiment.
DEMO := runs/sweeps/demo
DEMO_SETS := --set name=demo --set mlflow.experiment=cadis-demo --set num_trials=6 \
	--set epochs=2 --set scheduler.max_t=2 --set certify.race.enabled=false \
	--set certify.final.max_images=50
PYTEST_ARGS ?=

.PHONY: setup data tools demo test soak pretrain clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# What cluster/cadis-cluster (and its tests) call besides Ray and MLflow, and the C++ compiler
# that torch.compile's CPU backend builds its kernels with (`cadis certify --compile`).
SYSTEM_TOOLS := curl pgrep setsid g++

data: tools
	@if [ -f "$(FASHION_MNIST)" ] || [ -n "$$CADIS_DATA" ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" \
		     "or set CADIS_DATA to a folder with its IDX files" >&2; exit 1; \
	fi

tools:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -z "$$missing" ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing curl, procps and util-linux for cluster/cadis-cluster, g++ for torch.compile"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl procps util-linux g++; \
	else \
		echo "cluster/cadis-cluster and torch.compile need $(SYSTEM_TOOLS): sudo apt-get install curl procps util-linux g++" >&2; \
	fi

pretrain: setup
	$(BIN)/cadis pretrain --dataset fashion-mnist --out $(PRETRAINED)

# The demo sweep on a Ray started for it, on the committed pair: its table, its summary (the
# choice and its verdicts, where its figures are, how to open MLflow's UI on it). A second
# `make demo` resumes the sweep (a finished one prints its table and summary again).
demo: setup
	$(BIN)/cadis sweep sweeps/default.yaml $(DEMO_SETS) $$(test -f $(DEMO)/sweep.json && echo --resume)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault tests too long for the suite (docs/reliability.md says which): ASHA stopping a
# dozen trials, a tracking store down for minutes mid-sweep.
soak: setup
	$(BIN)/python -m pytest -m soak $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
