# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: demo demo-scdca demo-scdca-variants demo-peers test lint docs bench bench-lincs clean

# torch goes in first, pinned, so nothing later pulls a multi-GB CUDA build.
$(BIN)/scdca: pyproject.toml requirements.lock requirements-peers.lock requirements-eval.lock requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet -r requirements-peers.lock
	$(BIN)/pip install --quiet -r requirements-eval.lock
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps rxnfp==0.1.0 scgpt==0.2.4
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

# Inputs the demos share, made once (order-only on the venv, so reinstalling does not redo them):
# the demo screen, the pretraining atlas (unperturbed cells, same genes) and the backbone
# pretrained on it.
DEMO_DATA := runs/demo/data.h5ad
DEMO_ATLAS := runs/demo/atlas.h5ad
DEMO_BACKBONE_DIR := runs/demo/backbone_atlas
DEMO_BACKBONE := $(DEMO_BACKBONE_DIR)/best_model.pt
DEMO_MODELS := control,train_mean,dose_mean,pooled_mean,additive,ridge,knn,dominant,c3tl,scdca_stack

# The main job: the recommended scdca_stack next to the baselines and C3TL, all four tasks,
# 5 seeds, 2 workers, on the simulated screen's 256 most variable genes. Its backbone is
# untrained (random:4x128): on this screen pretraining changes scdca_routed's scores little and
# raises its error on new lines (RESULTS.md, "Does the demo need a pretrained backbone?", measured
# with scdca_routed, the stack's scDCA expert);
# `make demo-scdca` runs the pretrained one. Wall time on this machine: README.md.
demo: $(BIN)/scdca $(DEMO_DATA)
	$(BIN)/scdca benchmark --data $(DEMO_DATA) --out runs/demo --tasks all --seeds 5 --workers 2 \
		--models $(DEMO_MODELS) --n-top-genes 256 --backbone random:4x128 --encoder chemnet

$(DEMO_DATA): | $(BIN)/scdca
	$(BIN)/scdca simulate --out $@ --seed 0

$(DEMO_ATLAS): | $(BIN)/scdca
	$(BIN)/scdca simulate --atlas --out $@ --seed 0

$(DEMO_BACKBONE): | $(DEMO_ATLAS)
	$(BIN)/scdca pretrain --data $(DEMO_ATLAS) --out $(DEMO_BACKBONE_DIR) --steps 3000 --dropout 0

# make demo's grid with the backbone pretrained on the simulated atlas (3,000 steps, about 7 min),
# plus scdca_lowrank (routed's heads without the routing): does pretraining help? Compare with
# runs/demo, the same grid on an untrained backbone. 2 Ray workers. Its numbers: RESULTS.md.
demo-scdca: $(BIN)/scdca $(DEMO_DATA) $(DEMO_BACKBONE)
	$(BIN)/scdca benchmark --data $(DEMO_DATA) --out runs/scdca_demo --tasks all --seeds 5 --workers 2 \
		--models $(DEMO_MODELS),scdca_lowrank --n-top-genes 256 --backbone $(DEMO_BACKBONE_DIR) --encoder chemnet

# Every scDCA variant (the paper's adapter, ours, full fine-tuning) and biolord next to the
# baselines, one seed (about 55 min on 2 CPU cores, estimated from its parts, not timed end to
# end), then the scDCA family on an untrained backbone.
demo-scdca-variants: $(BIN)/scdca $(DEMO_DATA) $(DEMO_BACKBONE)
	$(BIN)/scdca benchmark --data runs/demo/data.h5ad --out runs/scdca_variants --tasks all --seeds 1 \
		--models control,train_mean,additive,ridge,knn,dominant,c3tl,biolord,scdca,scdca_film,scdca_lowrank,scdca_plus,scdca_plus_frozen,scdca_routed,finetune,feature \
		--n-top-genes 256 --backbone runs/demo/backbone_atlas --encoder chemnet --max-steps 200 --lr 1e-3
	$(BIN)/scdca benchmark --data runs/demo/data.h5ad --out runs/scdca_variants_random --tasks all --seeds 1 \
		--models control,dominant,ridge,scdca,scdca_lowrank,scdca_plus,scdca_routed \
		--n-top-genes 256 --backbone random:4x128 --encoder chemnet --max-steps 200 --lr 1e-3

# The opt-in peer STATE (arc-state, CC BY-NC-SA 4.0: non-commercial), not in the default set-up.
STATE_STAMP := $(VENV)/.state-installed
$(STATE_STAMP): requirements-state.lock | $(BIN)/scdca
	$(BIN)/pip install --quiet -r requirements-state.lock
	@touch $@

# The published peers biolord and STATE next to the recommended model and the baselines, all four
# tasks, 5 seeds, 2 workers, make demo's genes and encoder. Installs STATE. About 2.5 h on 2 CPU cores
# (estimated from its parts, which RESULTS.md ran as separate grids; not timed end to end).
demo-peers: $(BIN)/scdca $(DEMO_DATA) $(STATE_STAMP)
	$(BIN)/scdca benchmark --data $(DEMO_DATA) --out runs/demo_peers --tasks all --seeds 5 --workers 2 \
		--models control,dose_mean,ridge,biolord,state,state_pseudobulk,scdca_routed --n-top-genes 256 \
		--backbone random:4x128 --encoder chemnet

# Everything CI checks: format and lint, the docs (warnings are errors), every test including
# the slow ones (a plain `pytest` skips tests marked slow, for a quick loop while developing).
# Installs the opt-in STATE peer into .venv too, so its tests run (a test dependency, not a user one).
test: lint docs $(STATE_STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(BIN)/scdca
	$(BIN)/ruff format --check src tests bench docs
	$(BIN)/ruff check src tests bench docs
	$(BIN)/mypy

docs: $(BIN)/scdca
	$(BIN)/sphinx-build -q -W --keep-going -b html docs docs/_build/html

bench: $(BIN)/scdca
	$(BIN)/python bench/backbone.py
	$(BIN)/python bench/adapter_vs_finetune.py
	$(BIN)/python bench/encoders.py
	$(BIN)/python bench/novelty_sciplex.py
	$(BIN)/python bench/c3tl_vs_scdca.py
	$(BIN)/python bench/train_fit.py

# The unseen-drug grid on a real LINCS L1000 plate (about 5 min for LJP009 on 2 cores):
#   make bench-lincs PLATE=plate.gct COMPOUNDS=compounds.csv
PLATE ?= ../shared/data/lincs/LJP009_A375_24H_X1_B20_QNORM_n371x978.gct
COMPOUNDS ?= ../shared/data/lincs/LJP009_compounds.csv
bench-lincs: $(BIN)/scdca
	$(BIN)/python bench/lincs_plate.py $(PLATE) $(COMPOUNDS) --out runs/lincs_plate

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build docs/generated
