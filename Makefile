# segsvc: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/segsvc/v1/*.proto)
# The Open Inference Protocol (Triton's published protos, unchanged) -> segsvc/server/oip_pb/.
OIP_PROTOS := $(wildcard protos/oip/*.proto)
GEN_STAMP := segsvc/v1/.generated-stamp
# Standard protos (google.longrunning, google.rpc, google.api) staged from googleapis-common-protos.
STD_PROTOS := build/std-protos

export NO_ALBUMENTATIONS_UPDATE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install proto demo test test-fast bench clean mutation

install: $(STAMP) $(GEN_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Generated protobuf/gRPC code is a build artefact (git-ignored), built from protos/.
proto: $(GEN_STAMP)
$(GEN_STAMP): $(STAMP) $(PROTOS) protos/stage_standard.py $(OIP_PROTOS) protos/generate_oip.py
	mkdir -p segsvc/v1
	$(BIN)/python protos/stage_standard.py $(STD_PROTOS)
	$(if $(PROTOS),$(BIN)/python -m grpc_tools.protoc -Iprotos -I$(STD_PROTOS) --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS))
	$(BIN)/python protos/generate_oip.py .
	touch segsvc/v1/__init__.py $@

demo: install
	$(BIN)/python -m segsvc.demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/pip install -q -e '.[test,bench]'
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

# Mutation score of the modules below (not part of `make test` or CI; minutes per module).
# Each module in turn: its mutants, each checked by the tests (of [tool.mutmut] in
# pyproject.toml) that call the mutated function. No mutant is made inside a logging call.
# mutmut works in a scratch copy under build/, so its mutants/ never lands in the work tree.
# Each mutant's tests run in a process forked from mutmut's: OMP_NUM_THREADS=1 keeps torch from
# using an OpenMP pool there (a forked pool spins until the CPU limit, a false "timeout" kill).
MUTMUT_VERSION    := 3.8.1
MUTATION_DIR      := build/mutation
MUTATION_MODULES  ?= segsvc.inference.batcher segsvc.inference.codec segsvc.inference.containers segsvc.models.artifact training.metrics
MUTATION_CHILDREN ?= 1

mutation: install
	$(BIN)/python -c "import importlib.metadata as m; assert m.version('mutmut') == '$(MUTMUT_VERSION)'" 2>/dev/null \
		|| $(BIN)/pip install -q mutmut==$(MUTMUT_VERSION)
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	tar -c --exclude=__pycache__ pyproject.toml segsvc training tests | tar -x -C $(MUTATION_DIR)
	cd $(MUTATION_DIR) && for m in $(MUTATION_MODULES); do \
		echo "mutmut: $$m (log: $(MUTATION_DIR)/$$m.log)"; \
		OMP_NUM_THREADS=1 $(abspath $(BIN))/mutmut run --max-children $(MUTATION_CHILDREN) "$$m.*" >$$m.log 2>&1 \
			|| { tail -n 40 $$m.log; exit 1; }; \
	done
	cd $(MUTATION_DIR) && $(abspath $(BIN))/mutmut results --all true >results.txt
	@awk -F': ' -v mods="$(MUTATION_MODULES)" ' \
		BEGIN { n = split(mods, mod, " ") } \
		{ sub(/^ +/, "", $$1); for (i = 1; i <= n; i++) if (index($$1, mod[i] ".x") == 1) { total[i]++; count[i, $$2]++ } } \
		END { for (i = 1; i <= n; i++) { k = count[i, "killed"] + count[i, "timeout"]; \
			printf "%-26s %5.1f%% killed (%d of %d mutants; survived %d, no tests %d, timeout %d)\n", mod[i], \
				total[i] ? 100 * k / total[i] : 0, k, total[i], count[i, "survived"], count[i, "no tests"], count[i, "timeout"] } }' \
		$(MUTATION_DIR)/results.txt
	@echo "survivors: $(MUTATION_DIR)/results.txt; see one with: cd $(MUTATION_DIR) && $(abspath $(BIN))/mutmut show NAME"

clean:
	rm -rf $(VENV) segsvc/v1 segsvc/server/oip_pb out runs .pytest_cache
