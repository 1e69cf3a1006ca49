# Two commands on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RL     := $(VENV)/bin/relaylearn
DATA   := data/synth
DEMO_RUN ?= demo
# torch is pinned first so pip takes the local CPU wheel instead of a multi-GB CUDA build
TORCH  ?= torch==2.13.0

.PHONY: demo test install data clean chromium

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

$(DATA)/.done: $(VENV)/.installed
	$(RL) data synth $(DATA) --overwrite
	touch $@

data: $(DATA)/.done

demo: install data
	$(PY) -m relaylearn.demo --name $(DEMO_RUN)

# headless Chromium renders report.html in tests (Debian package; skipped with a reason if absent)
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser check of the report will be skipped"; }

test: install chromium
	$(VENV)/bin/ruff check relaylearn tests benchmarks
	$(VENV)/bin/ruff format --check relaylearn tests benchmarks
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf exps $(DATA) .pytest_cache
