# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install everything into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LAKE ?= data_lake
# synthetic (default) or studylike: CHAOS-layout healthy + TCGA-LIHC-layout HCC through the importers
DEMO_SOURCE ?= synthetic
# lesion signal of the synthetic cohort (hcc-assets demo --help); 0 = a null cohort
DEMO_LESION_CONTRAST ?= 1.25
# the demo lake's deployment settings (kept in <lake>/deployment.yaml): empty, the 5-minute demo's
# (hcc-assets demo's default, deploy/fast_demo.yaml); a file of your own; or `make demo FULL=1` for
# the study's settings (hcc-assets demo --full)
DEMO_SETTINGS ?=
FULL ?=
# OpenMP busy-waiting makes 2-thread torch ~10x slower on these CPUs; set before torch starts.
export OMP_WAIT_POLICY := PASSIVE
# ...but a thread that sleeps at once pays a wake-up at every parallel region, and nnU-Net's 2-D
# network runs hundreds per step: waiting threads spin this many times (microseconds) first. On 2
# idle cores a demo nnU-Net epoch took 14.2-15.6 s instead of 15.9-17.1 s, masks 7% faster
# (benchmarks/segmentation_config.py, 2026-12-04). Threads of one core each never wait.
export GOMP_SPINCOUNT := 10000
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install lock demo test test-fast lint lint-fast ui clean-lake bytecode

# Every package from requirements.lock (exact versions, sha256-checked), then the patched pyradiomics
# build and the project itself without dependencies: two installs a month apart are the same.
$(BIN)/.installed: pyproject.toml requirements.lock scripts/install_pyradiomics.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements.lock
	bash scripts/install_pyradiomics.sh $(BIN)/python
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

install: $(BIN)/.installed

# Every process of the suite and of the demo imports hcc_assets. Where PYTHONDONTWRITEBYTECODE is
# set (as on these machines) each would compile its modules again (about 0.25 s of CPU per process,
# hundreds of processes per `make test`); compileall writes the bytecode once, whatever that variable
# says, and skips files that did not change.
bytecode: install
	$(BIN)/python -m compileall -q -j 0 hcc_assets hcc_assets_tests benchmarks

# A fresh resolve of pyproject.toml in a scratch venv (the newest releases its bounds allow, the
# Dagster family and DuckDB pins, torch from this machine's disk), checked, then written to
# requirements.lock with hashes (scripts/lock.py). Review the diff, run `make test`, commit.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(LOCK_VENV)/bin/python -m pip install -q numpy versioneer
	bash scripts/install_pyradiomics.sh $(LOCK_VENV)/bin/python
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(LOCK_VENV)/bin/python -m pip install -q ".[test]"
	$(LOCK_VENV)/bin/python -m pip check
	$(LOCK_VENV)/bin/python scripts/lock.py --python $(LOCK_VENV)/bin/python --out requirements.lock
	rm -rf $(LOCK_VENV)

demo: bytecode
	$(BIN)/hcc-assets --lake $(LAKE) demo --source $(DEMO_SOURCE) --lesion-contrast $(DEMO_LESION_CONTRAST) $(if $(FULL),--full,$(if $(DEMO_SETTINGS),--settings $(abspath $(DEMO_SETTINGS))))
	$(BIN)/hcc-assets --lake $(LAKE) sql "SELECT c.patient_id, c.hcc, c.split, s.description AS t2_series, s.echo_time_ms AS te_ms, v.shape AS model_grid, round(m.liver_ml) AS liver_ml, round(m.dice_liver, 3) AS dice, (SELECT count(*) FROM radiomic_features r WHERE r.patient_id = c.patient_id) AS n_radiomic, e.patient_id IS NOT NULL AS has_embedding FROM cohort_split c JOIN scans s ON s.patient_id = c.patient_id AND s.chosen JOIN volumes v ON v.patient_id = c.patient_id AND v.kind = 'preprocessed' LEFT JOIN liver_masks m ON m.patient_id = c.patient_id LEFT JOIN deep_embeddings e ON e.patient_id = c.patient_id ORDER BY c.patient_id"
	@echo "Table 1 (validation patients; estimate [95% bootstrap CI]); report: $(LAKE)/reports/report.html"
	$(BIN)/hcc-assets --lake $(LAKE) sql "SELECT model, scheme, n, accuracy, precision, recall, f1, roc_auc FROM table_1"

# ruff (lint and format) and the import contracts between the layers: seconds
lint-fast: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# lint-fast, then mypy
lint: lint-fast
	$(BIN)/mypy

# The suite's scratch space (TMPDIR, so pytest's tmp_path: every test lake, DuckLake catalog, Dagster
# instance and Postgres server) on the RAM disk where the machine has one with room (4 GiB; the
# suite uses under 1): SQLite, DuckLake and Dagster commit with fsync, which on a virtual disk stalls
# the writing test while its core idles, and on tmpfs returns at once. Measured on 2 cores:
# `make test` 7m02s with /tmp on the disk, 6m07s on /dev/shm (README). Empty: the default folder.
TEST_TMPDIR ?= $(shell avail=$$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $$4}'); \
	[ -w /dev/shm ] && [ "$${avail:-0}" -ge 4194304 ] && echo /dev/shm/hcc-assets-tests-$$(id -u))
TEST_ENV := $(if $(TEST_TMPDIR),mkdir -p $(TEST_TMPDIR) && TMPDIR=$(TEST_TMPDIR))

# `make lint`, with mypy (about 45 s of CPU without its cache, as in a fresh clone) run
# niced beside the suite: it takes the CPU the suite leaves idle while it waits on daemons, servers
# and the browser. Its verdict counts as the tests' does; its report follows theirs.
test: lint-fast bytecode
	@nice -n 10 $(BIN)/mypy > $(VENV)/mypy.log 2>&1 & mypy=$$!; \
	$(TEST_ENV) $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --timeout 1800 --durations=15; tests=$$?; \
	wait $$mypy; typed=$$?; echo "mypy:"; cat $(VENV)/mypy.log; \
	exit $$(( tests || typed ))

# the unit tier: domain, steps, storage, sensors and schedules through Dagster's build contexts
test-fast: bytecode
	$(TEST_ENV) $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --timeout 600 -m "not integration"

ui: install
	$(BIN)/python -c "from hcc_assets.instance import ensure_dagster_home; ensure_dagster_home('$(LAKE)')"
	DAGSTER_HOME=$(abspath $(LAKE))/dagster_home HCC_ASSETS_LAKE=$(abspath $(LAKE)) \
		$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

clean-lake:
	find $(LAKE) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
