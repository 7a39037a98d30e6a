# The README's two commands: `make train` and `make test`. Each creates .venv when missing and installs
# the project editable (quick and idempotent once installed). GPU machines: `make train EXTRAS=gpu`.
EXTRAS ?= cpu
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: install train test bench clean chromium slurm

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS),test]'
	touch $@

train: $(STAMP)
	$(PY) -m kerasbig.train $(ARGS)

# Test files run on TEST_WORKERS processes, each file whole on one (its module fixtures are built once), in the
# order conftest.py gives (longest first; xdist would otherwise start the files with most tests first). Three on
# 2 cores: the tests wait often enough (process start-up, servers, peers) that a third keeps both cores busy.
TEST_WORKERS ?= 3
test: $(STAMP) chromium slurm
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

# The TensorBoard browser test drives Debian's Chromium (never a downloaded browser). Installed once where
# apt-get works; elsewhere those two tests are skipped.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will be skipped"

# The cluster tests start a private single-node SLURM cluster (Debian's packages, 13 MB). Installed once where
# apt-get works; elsewhere those tests are skipped.
slurm:
	@(command -v srun && command -v slurmctld && command -v slurmd && command -v munged) >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
		>/dev/null) || echo "SLURM could not be installed: the SLURM cluster tests will be skipped"

bench: $(STAMP)
	$(PY) -m kerasbig.bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
