# segsvc: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/segsvc/v1/*.proto)
GEN_STAMP := segsvc/v1/.generated-stamp
# Standard protos (google.longrunning, google.rpc, google.api) staged from googleapis-common-protos.
STD_PROTOS := build/std-protos

export NO_ALBUMENTATIONS_UPDATE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install proto demo test test-fast bench clean

install: $(STAMP) $(GEN_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Generated protobuf/gRPC code is a build artefact (git-ignored), built from protos/.
proto: $(GEN_STAMP)
$(GEN_STAMP): $(STAMP) $(PROTOS) protos/stage_standard.py
	mkdir -p segsvc/v1
	$(BIN)/python protos/stage_standard.py $(STD_PROTOS)
	$(if $(PROTOS),$(BIN)/python -m grpc_tools.protoc -Iprotos -I$(STD_PROTOS) --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS))
	touch segsvc/v1/__init__.py $@

demo: install
	$(BIN)/python -m segsvc.demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) segsvc/v1 out runs .pytest_cache
