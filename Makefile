# make demo: create .venv, install, run the whole attribution pipeline on the embedded digits, write a report.
# make test: create .venv, install, run the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
TRITON_VERSION := 3.7.1
TRANSFORMERS_VERSION := 5.24.0
STAMP := $(VENV)/.installed-$(TORCH_VERSION)-transformers-$(TRANSFORMERS_VERSION)

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned (a CPU wheel here; a loose range can pull a multi-GB CUDA build). Never torchvision:
# beside torch 2.13 it breaks `import diffusers`. backpack (a curvlinops dependency) asks for torchvision, so it
# is installed --no-deps with its real needs listed by hand; so are kronfluence and dattri.
$(STAMP): $(BIN)/python pyproject.toml setup.py
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q triton==$(TRITON_VERSION) setuptools wheel
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	$(BIN)/pip install -q --no-deps backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1
	$(BIN)/pip install -q unfoldNd einconv einops linear_operator opt-einsum
	# peers for the adapter tests and bench/peers.py; --no-deps: kronfluence's torchvision pin drags in CUDA torch
	$(BIN)/pip install -q --no-deps kronfluence==1.0.1 dattri==0.3.0
	$(BIN)/pip install -q accelerate pyyaml
	# text-conditional runs' --text-encoder (CLIPTextModel + CLIPTokenizer); its requirements hold no torch
	$(BIN)/pip install -q transformers==$(TRANSFORMERS_VERSION)
	$(BIN)/pip uninstall -y -q torchvision 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/kfac-influence demo --out runs/demo

bench: $(STAMP)
	$(BIN)/python -m pytest -q bench --benchmark-only -m "not slow or slow"
	env -u TRITON_INTERPRET $(BIN)/python bench/compile_check.py --jobs 2 && $(BIN)/python bench/roofline.py

clean:
	rm -rf $(VENV) runs
