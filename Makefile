# Two commands do all the set-up: `make run` and `make test` (each creates .venv and installs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# llama-cpp-python compiles llama.cpp. A native build uses AMX instructions on these Xeons and
# dies with SIGILL at the first generation, so pin a portable AVX2 build. pip caches the wheel,
# so a second install on the same machine does not rebuild.
export CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: run test lint format screenshots bench install install-dev browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(PY)
	$(PY) -m pip install -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: install ## start the dashboard (python app.py)
	$(PY) app.py

test: install-dev lint ## lint, then the whole test suite (the browser tests need `make browser`)
	$(PY) -m pytest

# The browser tests drive Debian's chromium, never a Playwright download. Needs root (CI).
browser: ## install chromium with apt-get if it is missing
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

screenshots: install-dev ## refresh docs/screenshots (the README's) from the browser tests
	SCREENSHOTS_DIR=docs/screenshots $(PY) -m pytest tests/e2e
	@# Keep only the pictures the README shows.
	@for f in docs/screenshots/*.png; do grep -q "$$f" README.md || rm "$$f"; done

bench: install-dev ## the embedded model vs llama-cpp-python, and /v1 and /chat vs direct calls
	$(PY) bench/local_tokens.py
	$(PY) bench/gateway.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
