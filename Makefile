# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: demo test bench clean

# torch goes in first, pinned, so nothing later pulls a multi-GB CUDA build.
$(BIN)/scdca: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps rxnfp==0.1.0 scgpt==0.2.4
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

demo: $(BIN)/scdca
	$(BIN)/scdca simulate --out runs/demo/data.h5ad --seed 0
	$(BIN)/scdca benchmark --data runs/demo/data.h5ad --models control,train_mean,additive,ridge,knn --tasks all --seeds 5 --out runs/demo

test: $(BIN)/scdca
	$(BIN)/python -m pytest -q

bench: $(BIN)/scdca
	$(BIN)/python bench/encoders.py
	$(BIN)/python bench/novelty_sciplex.py

clean:
	rm -rf $(VENV) runs .pytest_cache
