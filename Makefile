# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo_out

.PHONY: demo test lint install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision pinned first: the CPU machines here install these from a local cache.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/anomalyqc synth vials --out $(DEMO)/vials --seed 0 --n-train 200 --n-test-good 40 --n-test-defect 40
	$(VENV)/bin/anomalyqc synth vials --out $(DEMO)/calib --seed 1 --n-train 0 --n-test-good 40 --n-test-defect 40
	$(VENV)/bin/anomalyqc fit mhbc --data $(DEMO)/vials --out $(DEMO)/run_mhbc --image-size 256x320 --overwrite
	$(VENV)/bin/anomalyqc calibrate $(DEMO)/run_mhbc --data $(DEMO)/calib
	$(VENV)/bin/anomalyqc evaluate $(DEMO)/run_mhbc --data $(DEMO)/vials --report $(DEMO)/report/metrics.json
	@echo "Demo done. Report: $(DEMO)/report/report.html  (metrics: $(DEMO)/report/metrics.json)"

# Lint and type check first: a failure stops `make test` (and CI) before the suite runs.
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy src/anomalyqc

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bottle.py

clean:
	rm -rf $(DEMO)
