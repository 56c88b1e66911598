# Everything a newcomer needs: `make quickstart` (the main job) and `make test` (the test suite).
# Both create .venv and install etbench[dev] into it when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.etbench-installed

.PHONY: setup quickstart test lint bench gpu-bundle clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/etbench quickstart

# Headless Chromium + ChromeDriver (Debian's packages) for tests/test_mlflow_ui_browser.py. Best-effort: where they
# cannot be installed (no apt-get, not root, no network) only that test is skipped, with the reason.
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || \
	{ command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; } || \
	echo "note: chromium/chromedriver not installed: the MLflow UI browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/ruff check etbench tests analysis
	DS_ACCELERATOR=cpu $(BIN)/python -m etbench.engine.warmup
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check etbench tests analysis

bench: $(STAMP)
	$(BIN)/etbench bench core --out results/bench

# Wheels the GPU check needs beyond a bare CUDA image (pydantic, DeepSpeed built pure with DS_BUILD_OPS=0, ...) into
# .whl/, at this venv's versions; cluster/gpu_check.sh installs them there. See README "GPU check".
gpu-bundle: $(STAMP)
	$(BIN)/python -m etbench.cluster.gpu_bundle build --dest .whl

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
