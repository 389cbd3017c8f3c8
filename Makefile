# Two commands for a new user: `make demo` and `make test`. Both set up what is missing first:
# the virtualenv with the Python dependencies, and Debian's Fashion-MNIST package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cadis-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
MODELS := models/fashion-mnist
RESULTS := results/demo
# The demo certifies a quick subset (every 100th test image, n = 500); the README's table uses
# 500 images and n = 1000.
DEMO_CERTIFY := --n 500 --n0 100 --alpha 0.001 --skip 100 --quiet
PYTEST_ARGS ?=

.PHONY: setup data demo test pretrain clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

data:
	@if [ -f "$(FASHION_MNIST)" ] || [ -n "$$CADIS_DATA" ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" \
		     "or set CADIS_DATA to a folder with its IDX files" >&2; exit 1; \
	fi

pretrain: setup
	$(BIN)/cadis pretrain --dataset fashion-mnist --out $(MODELS)

demo: pretrain
	$(BIN)/cadis certify --models $(MODELS) --sigma 0.25 $(DEMO_CERTIFY) --out $(RESULTS)/baseline-sigma0.25
	$(BIN)/cadis certify --models $(MODELS) --sigma 0.5 $(DEMO_CERTIFY) --out $(RESULTS)/baseline-sigma0.5
	$(BIN)/cadis analyze $(RESULTS)/baseline-sigma0.25 $(RESULTS)/baseline-sigma0.5 \
		--labels "sigma=0.25" "sigma=0.5" --radii 0,0.25,0.5,0.75,1.0 --plot $(RESULTS)/baseline.png

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
