# Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
VENV := .venv
PYTHON ?= python3
CHECKSUM := $(shell cksum < pyproject.toml | cut -d' ' -f1)
BASE := $(VENV)/.installed-base-$(CHECKSUM)
FULL := $(VENV)/.installed-full-$(CHECKSUM)
export OMP_NUM_THREADS ?= 2

.PHONY: quickstart test benchmark clean

# The quickstart needs only the base install; the test suite also exercises the vLLM engine,
# Ray and DeepSpeed, and the wandb and MLflow trackers.
$(BASE): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e .
	touch $(BASE)

$(FULL): $(BASE)
	$(VENV)/bin/python -m pip install --quiet -e ".[test,vllm,distributed,data,models,trackers]"
	$(VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(FULL)

quickstart: $(BASE)
	$(VENV)/bin/efficient-rl train recipes/quickstart.yaml --overwrite

# The Slurm tests bring up a real local cluster (slurm/local-cluster.sh); its packages come first.
test: $(FULL)
	slurm/local-cluster.sh install
	$(VENV)/bin/python -m pytest tests

benchmark: $(FULL)
	$(VENV)/bin/python -m pip install --quiet -e ".[bench]"
	$(VENV)/bin/python benchmarks/step_vs_trl.py

clean:
	rm -rf $(VENV) runs
