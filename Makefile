# Two commands for a new user: `make demo` and `make test`. Both set up what is missing first:
# the virtualenv with the Python dependencies, and Debian's Fashion-MNIST package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cadis-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
MODELS := models/fashion-mnist
SWEEP := runs/sweeps/default
STORE := runs/sweeps/mlflow.db
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
	$(BIN)/cadis pretrain --dataset fashion-mnist --out $(MODELS)

# The default sweep on a Ray started for it, then its trials side by side from MLflow. A second
# `make demo` resumes the sweep (a finished one just prints its table again).
demo: pretrain
	$(BIN)/cadis sweep sweeps/default.yaml $$(test -f $(SWEEP)/sweep.json && echo --resume)
	$(BIN)/cadis compare --experiment cadis-default --plot $(SWEEP)/certified_accuracy.png
	@echo "Browse every run in MLflow's UI:"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(STORE) --host 127.0.0.1 --port 5000"
	@echo "  then open http://127.0.0.1:5000"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault tests too long for the suite (docs/reliability.md says which): ASHA stopping a
# dozen trials, a tracking store down for minutes mid-sweep.
soak: setup
	$(BIN)/python -m pytest -m soak $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
