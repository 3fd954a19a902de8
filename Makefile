# One-command set-up: `make demo` and `make test` create .venv and install everything on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= output/demo

.PHONY: install demo benchmarks test test-fast test-gpu bench lint clean

install: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[install] torch, torchvision and the pure-Python dependencies into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install -q 'setuptools<81' wheel
	$(PY) -m pip install -q 'setuptools<81' torch==2.14.1 torchvision==0.29.1 fvcore iopath pycocotools \
		tensorboard tqdm matplotlib pyyaml opencv-python-headless submitit pytest pytest-xdist lightly \
		scikit-image
	PYTHON=$(PY) bash tools/install_detectron2.sh
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)
	@echo "[install] done: $(VENV) is ready"

# The suite runs in TEST_WORKERS pytest-xdist processes, one test file each at a time (module
# fixtures are made once); each test runs 1 torch thread, so 2 workers fill a 2-core machine:
# 6 min 0 s vs 9 min 8 s in one process, measured back to back on 2 cores (2026-12-03).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# On a GPU machine: the CUDA tests (`make test` hides the GPUs: the CPU's suite on any machine),
# then bench/gpu_check.py, one JSON line per check (docs/gpus.md)
test-gpu: install
	TEST_CUDA=1 $(PY) -m pytest tests -q -m gpu
	$(PY) bench/gpu_check.py

demo: install
	bash tools/demo.sh $(DEMO_DIR)

# The transfer benchmarks (VOC07+12 C4, COCO Mask R-CNN C4 / FPN) at CPU size from the demo's SiMo
# and from random init over 3 seeds, then the report's benchmark table (runs the demo first; its
# finished stages are reused)
benchmarks: demo
	bash tools/benchmarks.sh $(DEMO_DIR)

# CPU-sized defaults; see bench/README.md for what each script measures and the recorded results
bench: install
	$(PY) bench/pretrain_step.py --arch resnet18 --size 64 --batch 32 --iters 3 --rounds 3 --threads 1 \
		--workers 1 --data-batches 4
	$(PY) bench/det_step.py --iters 5 --size 128 --batch 4
	$(PY) bench/convert_time.py --arch resnet50 --rounds 3 --warmup 1 --threads 1
	$(PY) bench/data_pipeline.py --size 224 --seconds 10
	$(PY) bench/negatives.py --repeats 5

lint: install
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check --line-length 100 --select E,F,W pretrain transfer tools tests bench

clean:
	rm -rf $(DEMO_DIR)
