# Two commands a newcomer needs: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The lock: every version make install (and the image) installs; `make lock` rewrites it from .venv.
CONSTRAINTS := constraints.txt
FMNIST_DIR := /usr/share/datasets/fashion-mnist

# Runs log to a local MLflow store unless MLFLOW_TRACKING_URI points at a server.
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/outputs/mlflow.db
HJEPA := $(VENV)/bin/hjepa

.PHONY: install lock fashion-mnist kubectl test lint demo bench mlflow-ui data repro image pipeline

$(STAMP): pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --constraint $(CONSTRAINTS) -e ".[tracking,server,pipeline,dev,bench]"
	touch $(STAMP)

# After a dependency change in pyproject.toml is installed into .venv: keep the header, re-pin the rest.
lock:
	{ grep '^#' $(CONSTRAINTS); $(PY) -m pip freeze --all --exclude-editable --exclude pip; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

# The embedded default dataset: Debian's package where apt exists, else torchvision downloads it.
fashion-mnist:
	@if [ ! -d $(FMNIST_DIR) ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || \
		echo "note: could not apt-get install dataset-fashion-mnist; torchvision will download it"; \
	fi

# kubectl renders manifests/ (kustomize) in the manifest tests; they skip where it is missing.
kubectl:
	@if ! command -v kubectl >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q kubectl >/dev/null 2>&1 || \
		echo "note: could not apt-get install kubectl; the manifest tests will be skipped"; \
	fi

install: $(STAMP) fashion-mnist kubectl

test: install
	$(PY) -m pytest -q -x

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy hjepa_core hjepa_kfp

# The main job on the embedded default: the spec's examples, then the Kubeflow pipeline run locally
# (KFP SubprocessRunner): shard -> 3 minutes of H-JEPA multi-crop pretraining on the CPU (a time
# budget: the schedules follow the clock) -> linear probe + kNN against both baselines, in MLflow.
DEMO_BUDGET_S ?= 180
demo: install
	@mkdir -p outputs
	$(PY) examples/multicrop_training_example.py
	$(HJEPA) pipeline run-local --root outputs/pipeline --config configs/fashion_mnist.yaml \
		--max_samples 8192 --max_test_samples 2000 training.time_budget_s=$(DEMO_BUDGET_S)
	@echo "Browse the runs: make mlflow-ui  (then open http://127.0.0.1:5000)"

# The one image of the components, the MLflow server and the training jobs (needs a Docker engine).
IMAGE ?= ghcr.io/hjepa/hjepa:0.1.0
image:
	docker build -f components/Dockerfile -t $(IMAGE) .

# Recompile pipelines/hjepa_pipeline.yaml (for another image: make pipeline IMAGE=...).
pipeline: install
	$(HJEPA) pipeline compile --image $(IMAGE) --output pipelines/hjepa_pipeline.yaml

# DVC: data/ (tracked by data.dvc) from Debian's package or a download, then the pipeline.
data: install
	$(HJEPA) data fetch fashion_mnist data/

repro: data
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

bench: install
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_shards.py
