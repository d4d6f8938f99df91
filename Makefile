# Two commands a newcomer needs: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install fashion-mnist test lint demo bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[tracking,pipeline,dev,bench]"
	touch $(STAMP)

# The embedded default dataset: Debian's package where apt exists, else torchvision downloads it.
fashion-mnist:
	@if [ ! -d $(FMNIST_DIR) ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
		echo "note: could not apt-get install dataset-fashion-mnist; torchvision will download it"; \
	fi

install: $(STAMP) fashion-mnist

test: install
	$(PY) -m pytest -q -x

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(PY) examples/multicrop_training_example.py

bench: install
	$(PY) benchmarks/bench_data.py
