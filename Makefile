# The README's two commands: `make train` and `make test`. Each creates .venv when missing and installs
# the project editable (quick and idempotent once installed). GPU machines: `make train EXTRAS=gpu`.
EXTRAS ?= cpu
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRAS)
# tensorflow-serving-api asks for the full `tensorflow` wheel; only its protos are used, so it goes in
# without dependencies and a CPU machine keeps tensorflow-cpu.
SERVING_API := tensorflow-serving-api>=2.20,<2.22

.PHONY: install train test bench clean chromium

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS),test]'
	$(PY) -m pip install -q --no-deps '$(SERVING_API)'
	touch $@

train: $(STAMP)
	$(PY) -m kerasbig.train $(ARGS)

test: $(STAMP) chromium
	$(PY) -m pytest $(ARGS)

# The TensorBoard browser test drives Debian's Chromium (never a downloaded browser). Installed once where
# apt-get works; elsewhere those two tests are skipped.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will be skipped"

bench: $(STAMP)
	$(PY) -m kerasbig.bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
