# Two commands for a fresh machine:  `make demo`  and  `make test`  (both create .venv and install).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.accel-installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench bench-cache bench-gpu bench-gpu-quick kernel-report notebooks weights scalelong clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

## generate 8 images with the embedded miniature pipeline into outputs/ and print their CLIP scores
demo: setup
	$(VENV)/bin/accel generate --num-images 8 --out outputs

## the whole test suite (slow checks included)
test: setup
	$(PY) -m pytest -q -ra

## the quick part of the suite
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

## the ScaleLong training experiment (docs/scalelong/summary.json; about an hour on one CPU thread)
scalelong: setup
	$(PY) -m accel.experiments.scalelong --summary docs/scalelong/summary.json

## regenerate docs/BENCHMARKS.md (about an hour on one CPU thread)
bench: setup
	$(VENV)/bin/accel bench --out docs/BENCHMARKS.md

## regenerate docs/CACHE_BENCHMARKS.md: every cache mode's fidelity against full UNet calls (about 70 minutes on one CPU thread)
bench-cache: setup
	$(VENV)/bin/accel bench --sections curves --out docs/CACHE_BENCHMARKS.md

## re-execute the notebooks in place, with their outputs and figures (one CPU thread)
notebooks: setup
	$(PY) notebooks/execute.py

## the GPU benchmark -> docs/GPU_BENCHMARKS.md (one CUDA GPU, < 10 min; 'not run' without one). On a machine
## with torch and triton but no network: make bench-gpu PY=python3 STAMP=   (see accel/bench/gpu.py)
bench-gpu: setup
	$(PY) -m accel bench --gpu --out docs/GPU_BENCHMARKS.md

## the quick GPU benchmark -> docs/GPU_BENCHMARKS.md: SD 1.5 and SDXL in about 8 minutes (10 steps, CUDA-graph rows
## first, the ten heaviest layer shapes). On a device machine without diffusers: bash scripts/gpu_bench.sh
bench-gpu-quick: setup
	$(PY) -m accel bench --gpu --quick --out docs/GPU_BENCHMARKS.md

## compile every Triton kernel for sm_80 and sm_90a on this machine: registers, spills, int8 MMA count
kernel-report: setup
	$(PY) -m accel.kernels.build_report --out build/kernel-report --jobs 2

## retrain the miniature world from scratch (about 3 hours on one CPU thread per stage; resumable)
weights: setup
	$(PY) -m accel.miniature.train tokenizer
	$(PY) -m accel.miniature.train vae
	$(PY) -m accel.miniature.train vae_decoder
	$(PY) -m accel.miniature.train clip
	$(PY) -m accel.miniature.train unet
	$(PY) -m accel.miniature.train export

clean:
	rm -rf outputs .pytest_cache
