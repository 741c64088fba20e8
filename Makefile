# clapscale: `make demo` and `make test` are the two commands a newcomer needs.
# Both create the virtual environment on first use; nothing here downloads weights or data.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# DeepSpeed JIT-builds a small C++ op once; keep the build inside the checkout.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

DEMO_SHARDS := shards/demo
DEMO_CLIPS  := 2400
DEMO_CONFIG := configs/demo.yaml
DEMO_RUN    := runs/demo
# Extra recipe overrides, e.g. `make demo DEMO_ARGS="train.steps=600"`.
DEMO_ARGS   ?=

# `make real`: real sound from Debian's game libraries (downloads ~0.7 GB of .debs once into .cache/real).
REAL_SHARDS := shards/real
REAL_CONFIG := configs/real.yaml
REAL_RUN    := runs/real
REAL_ARGS   ?=

.PHONY: env test demo real clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade-strategy only-if-needed -e '.[dev]'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Shards are built once (a rerun finds them complete); the model is trained afresh every time:
# $(DEMO_RUN) is replaced, so a rerun never resumes from an older recipe's checkpoint.
demo: $(STAMP)
	$(BIN)/python tools/make_shards.py --synthetic $(DEMO_CLIPS) --out $(DEMO_SHARDS) --workers 2
	$(BIN)/python tools/make_shards.py --verify $(DEMO_SHARDS) --workers 2
	rm -rf $(DEMO_RUN)
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m clapscale.train.cli $(DEMO_CONFIG) \
		train.out_dir=$(dir $(DEMO_RUN)) train.name=$(notdir $(DEMO_RUN)) train.resume=none $(DEMO_ARGS)
	$(BIN)/python -m clapscale.cli eval --checkpoint $(DEMO_RUN)/model --shards '$(DEMO_SHARDS)/test/000000.tar' \
		--task retrieval,zeroshot --device cpu --out $(DEMO_RUN)/metrics.json
	@echo "Held-out test figures above are in $(DEMO_RUN)/metrics.json; training curves: $(BIN)/tensorboard --logdir $(DEMO_RUN)"

real: $(STAMP)
	$(BIN)/python tools/real_corpus.py --out $(REAL_SHARDS) --workers 2
	rm -rf $(REAL_RUN)
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m clapscale.train.cli $(REAL_CONFIG) \
		train.out_dir=$(dir $(REAL_RUN)) train.name=$(notdir $(REAL_RUN)) train.resume=none $(REAL_ARGS)
	$(BIN)/python tools/real_report.py --checkpoint $(REAL_RUN)/model --shards $(REAL_SHARDS) --out $(REAL_RUN)/metrics.json

clean:
	rm -rf $(VENV) .cache runs $(DEMO_SHARDS) $(REAL_SHARDS)
