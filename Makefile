# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

# uv installs the same packages as pip (torch's CUDA wheels are most of the 6.5 GB) in a third to a
# sixth of the time: it downloads and unpacks in parallel. It reads no pip configuration, so where
# it cannot install (a private index set in pip.conf, say), pip does. Pinned: the version measured.
# Bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (containers, CI)
# every process would otherwise compile the imports of torch, torchvision and transformers from
# source (unimed.load: 13.0 -> 5.4 s; the install: +22 s, once).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==0.13.9 && $(BIN)/uv pip install --quiet --compile-bytecode \
		--python $(BIN)/python -e '.[test]' \
		|| $(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/unimed demo --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/pytest

clean:
	rm -rf runs data/phantom
