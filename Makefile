# UniMP Edge developer entry points. `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PYTHON ?= python3
PIP     = $(VENV)/bin/pip
BIN     = $(VENV)/bin
DEMO   ?= out/demo
# Upstream packages used only by the parity tests and the benchmark baselines; installed without their
# dependency pins (open-flamingo pins an old torch), see requirements-parity.txt.
PARITY  = requirements-parity.txt

.PHONY: install demo test lint bench clean cpp

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt $(PARITY)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[export,dev,ray]'
	$(PIP) install --quiet -c constraints.txt --no-deps -r $(PARITY)
	touch $@

# The trained tiny demo: synthetic shop, CPU training, export (measured: 3:04 wall, 338 CPU s on 2 quiet cores; 6:07 busy). Its shop/ marks an
# export made since the demo was trained (older untrained exports have none). The malloc thresholds keep glibc from
# mapping and unmapping every large training tensor: measured on a 40-step export, system time 14.6 s -> 2.0 s.
$(DEMO)/shop/test.jsonl: | install
	MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 $(BIN)/unimp export --demo tiny --out $(DEMO)

demo: install $(DEMO)/shop/test.jsonl
	$(BIN)/python -m runtime.demo --artifacts $(DEMO)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy unimp export runtime benchmarks

bench: install
	$(BIN)/unimp bench --preset small --out bench-results

cpp:
	cmake -S . -B build/cpp && cmake --build build/cpp -j2

clean:
	rm -rf out build bench-results .pytest_cache .mypy_cache .ruff_cache
