# Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
VENV := .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
export OMP_NUM_THREADS ?= 2

.PHONY: quickstart test benchmark clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/efficient-rl train recipes/quickstart.yaml --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests

benchmark: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e ".[bench]"
	$(VENV)/bin/python benchmarks/step_vs_trl.py

clean:
	rm -rf $(VENV) runs
