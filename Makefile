# The two quickstart commands: `make serve` (install, then run warmpool on its embedded default) and
# `make test` (install with the development extras, then run the test suite). CI runs `make lint` (ruff and
# mypy) and `make test`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Portable llama.cpp build flags: a native build crashed at the first decode on the CPUs we test on.
# With a GPU, set your own, e.g. `make serve CMAKE_ARGS=-DGGML_CUDA=on`.
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
export CMAKE_ARGS

# Programs some tests drive for real: headless Chromium (the status page), Prometheus (the dashboard),
# openssl (a certificate for the HTTPS upstream test), HAProxy (three hosts in network namespaces behind it),
# nginx (its configuration check), and cmake and g++ (to build llama-server).
SYSTEM_TOOLS := chromium prometheus openssl haproxy nginx cmake g++

.PHONY: serve test lint bench clean system-deps llama-server aider

serve: $(VENV)/.installed-serve
	$(BIN)/warmpool serve $(ARGS)

test: $(VENV)/.installed-dev system-deps llama-server aider
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# llama.cpp's llama-server for the `kind: command` tests, built once from the sources the llama-cpp-python
# sdist vendors and cached under ~/.cache/warmpool (minutes the first time). Exit 2 means the sources could
# not be had: the tests that need it then skip, saying why.
llama-server: $(VENV)/.installed-dev system-deps
	$(BIN)/python tests/build_llama_server.py || [ $$? -eq 2 ]

# Aider (PyPI's aider-chat) for tests/test_recipe_aider.py, which runs the README's Aider recipe for real:
# installed once in a virtualenv of its own (it pins its own litellm, openai, pydantic and numpy) and cached
# under ~/.cache/warmpool (about a minute the first time). Exit 2 means it cannot be had (no Python 3.10 to
# 3.12, PyPI out of reach): the test then skips, saying why.
aider: $(VENV)/.installed-dev
	$(BIN)/python tests/install_aider.py || [ $$? -eq 2 ]

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check warmpool tests benchmarks
	$(BIN)/mypy

# Says what it installs, and why, before it does; apt's own output shows (`make test SYSTEM_DEPS=no` skips this).
SYSTEM_DEPS ?= yes
system-deps:
	@[ "$(SYSTEM_DEPS)" = yes ] || exit 0; \
	missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			echo "system-deps: installing Debian packages:$$missing (apt-get install; the status page, dashboard,"; \
			echo "system-deps: HTTPS upstream, multi-host and llama-server tests need them; SYSTEM_DEPS=no skips this)"; \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
		else echo "note: install$$missing (Debian packages) to run every test; without them those tests skip"; fi; \
	fi

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/overhead.py

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet '.[llamacpp,demo]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[llamacpp,demo,dev]'
	touch $@ $(VENV)/.installed-serve

clean:
	rm -rf $(VENV) build *.egg-info
