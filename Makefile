# seldon-caffe: `make demo` and `make test` work on a fresh machine (as root for caffe-env).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV     ?= .venv
VENV117  ?= .venv-117
EXTRAS   ?= test,onnx,openvino,tensorflow,torch,torchvision,triton,mlserver
# Python 3.12: seldon-core 1.19 needs it. Take python3.12 from PATH, else pyenv's.
PYTHON312 ?= $(shell for p in python3.12 $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
PY       := $(VENV)/bin/python
MODEL    ?= examples/vision
# The second Seldon lane: 1.17.1 is the last Apache-2.0 release. Its gunicorn 20.1 imports
# pkg_resources, which setuptools 70 removed; it brings protobuf 3.20.3.
SELDON117 := "seldon-core==1.17.1" "setuptools<70"
E2E_117  := tests/test_e2e.py tests/test_caffe_format.py
# Images (podman, as root; scripts/image/). The tag follows the package's version.
VERSION     := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' seldon_caffe/__init__.py)
BUILDER     ?= localhost/seldon-caffe-s2i:$(VERSION)
GPU_BUILDER ?= localhost/seldon-caffe-s2i-gpu:$(VERSION)
IMAGE       ?= localhost/seldon-caffe-$(notdir $(abspath $(MODEL))):latest

.PHONY: help setup setup-117 caffe-env tools demo serve test test-fast test-117 lint bench proto clean \
	image image-gpu model-image image-test

help:
	@echo "make setup      create $(VENV) (Python 3.12) with seldon-caffe and its extras ($(EXTRAS))"
	@echo "make demo       set up, serve $(MODEL) and answer a sample request"
	@echo "make serve      serve MODEL=$(MODEL) on ports 9000 (REST) / 5000 (gRPC) / 6000 (metrics)"
	@echo "make test       set up (both Seldon lanes and real Caffe), then run every test"
	@echo "make test-fast  the quick tier: no root, no services, no real Caffe, no GPU (-m \"$(FAST)\")"
	@echo "make test-117   the tests that also run on the seldon-core 1.17.1 lane ($(E2E_117))"
	@echo "make caffe-env  build the real-Caffe reference root (Debian bullseye python3-caffe; root only)"
	@echo "make tools      install protoc and shellcheck with apt-get when missing (root only)"
	@echo "make lint       ruff check, ruff format --check and mypy"
	@echo "make image      build the s2i builder image $(BUILDER) with podman (root; docs/deploy.md)"
	@echo "make image-gpu  build the GPU builder image $(GPU_BUILDER)"
	@echo "make model-image MODEL=DIR [IMAGE=NAME]  build a model image from DIR, as s2i build does"
	@echo "make image-test build both builders and run the container tests (part of make test)"
	@echo "make bench      run benchmarks/ and update docs/benchmarks.md"

# One stamp per set of extras: `make setup EXTRAS=onnx` (README's walk-through) and a later
# `make test` (every extra) install into the same .venv, each what it needs.
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(STAMP): setup.cfg pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (install it, or set PYTHON312=/path/to/python3.12)"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade "pip>=24"
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]"
	touch $@

$(VENV117)/.installed: setup.cfg pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found"; exit 1; }
	$(PYTHON312) -m venv $(VENV117)
	$(VENV117)/bin/pip install -q $(SELDON117) -e ".[test]"
	touch $@

setup: $(STAMP)

setup-117: $(VENV117)/.installed

caffe-env:
	bash scripts/caffe-env.sh

# protoc and shellcheck: without them the tests that recompile caffe.proto and lint the
# scripts skip; wrk checks `seldon-caffe bench` in `make bench`. Installed when missing and possible (root, apt-get); said when not. Quiet
# when both are there.
TOOLS := protoc:protobuf-compiler shellcheck:shellcheck wrk:wrk  # wrk: benchmarks/bench_vs_wrk.py
tools:
	@missing=""; for tool in $(TOOLS); do command -v "$${tool%%:*}" >/dev/null || missing="$$missing $${tool#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then \
		echo "make tools: cannot install$$missing (needs root and apt-get); the tests that use them skip"; exit 0; fi; \
	echo "make tools: installing$$missing"; \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
		|| echo "make tools: apt-get could not install$$missing; the tests that use them skip"

demo: setup
	$(PY) scripts/demo.py $(MODEL)

serve: setup
	$(VENV)/bin/seldon-caffe serve $(MODEL)

# The generated caffe_pb2 must also work on the 1.17.1 lane's protobuf 3.20: the main run
# checks it through that venv's interpreter (tests/test_caffe_format.py). Strict: a skip other
# than the GPU ones tests/conftest.py allows fails the run (everything else is installed here).
test: STRICT := SELDON_CAFFE_STRICT_SKIPS=1
test: setup setup-117 caffe-env tools
	SELDON_CAFFE_PB320_PYTHON=$(VENV117)/bin/python $(STRICT) $(PY) -m pytest -q -rs -m "not image"
	$(MAKE) test-117 STRICT="$(STRICT)"
	$(MAKE) image-test STRICT="$(STRICT)"

# The quick tier: tests marked e2e (a real service), reference (real Caffe), gpu or slow are
# left out (markers: setup.cfg's [tool:pytest]). It needs only `make setup`, no root.
FAST := not e2e and not reference and not gpu and not slow and not image
test-fast: setup
	$(PY) -m pytest -q -rs -n 2 -m "$(FAST)"

test-117: setup-117
	SELDON_CAFFE_PB320_PYTHON=$(VENV117)/bin/python $(STRICT) $(VENV117)/bin/python -m pytest -q -rs $(E2E_117)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy  # [tool.mypy] in pyproject.toml: seldon_caffe/
	@if command -v shellcheck >/dev/null; then shellcheck -x s2i/bin/* scripts/*.sh scripts/image/*.sh; else echo "shellcheck not installed: skipped"; fi

bench: setup caffe-env tools
	nice $(PY) benchmarks/runtimes.py
	nice $(PY) benchmarks/onnx_precisions.py
	nice $(PY) benchmarks/tensorflow.py
	nice $(PY) benchmarks/torch_runtime.py
	nice $(PY) benchmarks/payloads.py

# The stand-in base (when python:3.12-slim-bookworm cannot be pulled) copies this interpreter.
image:
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (set PYTHON312=/path/to/python3.12)"; exit 1; }
	SELDON_CAFFE_BASE_PYTHON=$(PYTHON312) bash scripts/image/build.sh builder cpu $(BUILDER)

image-gpu:
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (set PYTHON312=/path/to/python3.12)"; exit 1; }
	SELDON_CAFFE_BASE_PYTHON=$(PYTHON312) bash scripts/image/build.sh builder gpu $(GPU_BUILDER)

model-image: image
	bash scripts/image/build.sh model $(MODEL) $(BUILDER) $(IMAGE)

# The container tests (tests/test_image.py, marker `image`) on the builders just built (they
# build their model images from these), then the pod-cost figures into docs/deploy.md.
image-test: setup image image-gpu
	SELDON_CAFFE_TEST_BUILDER=$(BUILDER) SELDON_CAFFE_TEST_GPU_BUILDER=$(GPU_BUILDER) $(STRICT) \
		$(PY) -m pytest -q -rs -m image tests/test_image.py
	$(PY) benchmarks/pod_cost.py $(BUILDER) $(GPU_BUILDER)

proto:
	bash scripts/gen_caffe_pb2.sh

clean:
	rm -rf $(VENV) $(VENV117) .pytest_cache
