# Two entry points (see README): `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean slurm-up slurm-down

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	# DeepSpeed's CPU communication op, compiled once here rather than in the first run (about 40 s).
	$(PY) -c 'from nepa_scale.engine.distributed import prebuild_cpu_comm_op; prebuild_cpu_comm_op()'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/nepa-scale demo

lint: setup
	$(PY) -m ruff check nepa_scale tests

# A real single-node SLURM cluster for the launch tests (installs Debian's packages if missing).
slurm-up:
	bash slurm/local/start.sh

slurm-down:
	bash slurm/local/stop.sh

test: lint slurm-up
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15

clean:
	rm -rf runs .pytest_cache
