# Two commands for a fresh machine (only Python, pip and gcc needed):
#   make app    set up .venv when missing, then open the dashboard on its embedded default
#   make test   set up .venv when missing, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
PORT ?= 8501

.PHONY: app test setup clean-venv deepsparse

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

app: $(STAMP)
	$(PY) -m app_support.serve --server.port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

clean-venv:
	rm -rf $(VENV)

# Optional: DeepSparse 1.8 (the benchmark's third peer) in an interpreter of its own, since it needs numpy<2 and
# onnx<1.15 and Python 3.8-3.11; then `bench engine --peers --deepsparse-python .venv-deepsparse/bin/python`.
DEEPSPARSE_PYTHON ?= python3.11
deepsparse: .venv-deepsparse/.installed
.venv-deepsparse/.installed:
	$(DEEPSPARSE_PYTHON) -m venv .venv-deepsparse
	.venv-deepsparse/bin/python -m pip install --quiet "deepsparse==1.8.0" "numpy<2" "onnx<1.15"
	touch $@
