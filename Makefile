# Developer shortcuts: `make test`, `make lint`, `make bench` (see benchmarks/README.md).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python
RESULTS ?= benchmarks/results
# Paired rounds per overhead run (each fig3b round with all variants takes ~24 s on a quiet
# 2-core machine, a paper-resunet round of 5-step trials ~6 s).
FIG3B_PAIRS ?= 20
RESUNET_PAIRS ?= 20
RESUNET_STEPS ?= 5
# Paired rounds of the side-by-side run (FCN, ResNet-18-like CNN, small GPT-2).
STACK_PAIRS ?= 10
export MPLBACKEND ?= Agg

BENCH_FILES := benchmarks/harness/*.py benchmarks/overhead.py benchmarks/runfile.py benchmarks/compare.py \
	benchmarks/floor.py benchmarks/kernel_speed.py benchmarks/gpu.py benchmarks/soak.py \
	benchmarks/frozen_backbone.py benchmarks/plot_speed.py benchmarks/startup.py benchmarks/sweep_speed.py \
	benchmarks/report_speed.py benchmarks/call_cost.py benchmarks/budget_runs.py

.PHONY: help test lint bench bench-overhead bench-resunet bench-runfile bench-plot bench-soak \
	bench-stacks bench-targets bench-budget bench-gpu-dry bench-gpu bench-summary

help:
	@echo "make test    pytest"
	@echo "make lint    ruff check, ruff format --check (benchmarks), mypy"
	@echo "make bench   the CPU benchmarks (about 13 min on a quiet 2-core machine),"
	@echo "             output and JSON in $(RESULTS)/"
	@echo "make bench-stacks    fig3b-long-9, resnet18, gpt2-mini side by side, C kernels on/off"
	@echo "make bench-targets   param and all probes every step, all probes under budgets"
	@echo "                     of 1 % and 5 %: four workloads, 60 single-step pairs each"
	@echo "make bench-budget    bench-targets, then whole runs under budgets (budget_runs.py)"
	@echo "make bench-gpu-dry   benchmarks/gpu.py --device cpu --quick (checks the GPU script)"
	@echo "make bench-gpu       on a CUDA machine: CUDA tests + paper-resunet GPU overhead"
	@echo "make bench-compare BASE=<rev>   overhead rows of <rev> and the working tree,"
	@echo "                     alternating (about 15 min)"
	@echo "make bench-floor     paper-resunet's parameter statistics against the memory floor"

test:
	$(PYTHON) -m pytest

lint:
	ruff check .
	ruff format --check $(BENCH_FILES)
	mypy
	mypy $(BENCH_FILES)

# Each benchmark prints to the terminal and to $(RESULTS)/<name>.txt; progress goes to stderr.
bench: bench-overhead bench-resunet bench-runfile bench-plot bench-soak bench-summary

$(RESULTS):
	mkdir -p $@

bench-overhead: | $(RESULTS)
	$(PYTHON) benchmarks/overhead.py --model fig3b-long-9 --pairs $(FIG3B_PAIRS) \
		--memory-steps 10 --json $(RESULTS)/overhead_fig3b.json | tee $(RESULTS)/overhead_fig3b.txt

# The FCN next to third-party workloads (pure torch / transformers configs), with the recorder's
# C kernels on and off (GRADFLOW_NATIVE=0); not part of `make bench`.
bench-stacks: | $(RESULTS)
	$(PYTHON) benchmarks/overhead.py --model fig3b-long-9,resnet18,gpt2-mini --pairs $(STACK_PAIRS) \
		--variants param,all,param-torch,all-torch --no-memory \
		--json $(RESULTS)/overhead_stacks.json | tee $(RESULTS)/overhead_stacks.txt

# Parameter statistics and all probes every step, and all probes under overhead budgets of
# 1 % and 5 %, on four workloads: 60 pairs of single steps each.
bench-targets: | $(RESULTS)
	$(PYTHON) benchmarks/overhead.py --model fig3b-long-9,resnet18,gpt2-mini,paper-resunet \
		--pairs 60 --steps-per-trial 1 --variants param,all,budget-1pc,budget-5pc --no-memory \
		--json $(RESULTS)/overhead_targets.json | tee $(RESULTS)/overhead_targets.txt

# The same, then whole runs under budgets of 1 % and 5 %, each in a fresh process.
bench-budget: bench-targets
	$(PYTHON) benchmarks/budget_runs.py --model fig3b-long-9 --budgets 0.01,0.05 --steps 120 \
		--rounds 2 --json $(RESULTS)/budget_runs_fig3b.json | tee $(RESULTS)/budget_runs_fig3b.txt

# wandb.watch and TensorBoard histograms cost seconds per step on 11 M parameters: left out;
# so is every-10th-step recording (shown on fig3b), whose 5-step trials would differ.
bench-resunet: | $(RESULTS)
	$(PYTHON) benchmarks/overhead.py --model paper-resunet --pairs $(RESUNET_PAIRS) \
		--steps-per-trial $(RESUNET_STEPS) --variants param,all,cockpit \
		--memory-steps 10 \
		--json $(RESULTS)/overhead_resunet.json | tee $(RESULTS)/overhead_resunet.txt

bench-runfile: | $(RESULTS)
	$(PYTHON) benchmarks/runfile.py --json $(RESULTS)/runfile.json | tee $(RESULTS)/runfile.txt

bench-plot: | $(RESULTS)
	$(PYTHON) benchmarks/plot_speed.py --repeat 1 | tee $(RESULTS)/plot_speed.txt

bench-soak: | $(RESULTS)
	$(PYTHON) benchmarks/soak.py --json $(RESULTS)/soak.json | tee $(RESULTS)/soak.txt

bench-summary:
	@echo
	@echo "== headlines ($(RESULTS)/*.txt)"
	@grep -h -E '^(recorder/plain|wandb.watch/gradflow|run file:|soak:|headline:)' \
		$(RESULTS)/overhead_fig3b.txt $(RESULTS)/overhead_resunet.txt $(RESULTS)/runfile.txt \
		$(RESULTS)/plot_speed.txt $(RESULTS)/soak.txt

bench-gpu-dry:
	$(PYTHON) benchmarks/gpu.py --device cpu --quick

# On a CUDA machine, in one call of under 7 minutes: the CUDA tests, then the GPU goal's
# workload (paper-resunet, batch 4 x 256x256) with param, all and all-torch against plain.
# GRADFLOW_TRITON=1: "all" with the opt-in Triton kernel, "all-torch" without it.
bench-gpu:
	OUT=$${OUT:-device-out} SMOKE=0 BENCH_S=300 GRADFLOW_TRITON=1 \
		GPU_ARGS="--models paper-resunet:256:4 --pairs 60" bash benchmarks/cuda_checks.sh

# Before/after on one machine in one sitting: overhead.py of BASE (a git worktree in the temp
# directory) and of the working tree, in alternating rounds; not part of `make bench`.
.PHONY: bench-compare bench-floor
bench-compare: | $(RESULTS)
	@test -n "$(BASE)" || { echo "usage: make bench-compare BASE=<git revision>"; exit 2; }
	$(PYTHON) benchmarks/compare.py --base $(BASE) --json $(RESULTS)/compare.json \
		| tee $(RESULTS)/compare.txt

bench-floor: | $(RESULTS)
	$(PYTHON) benchmarks/floor.py --json $(RESULTS)/floor.json | tee $(RESULTS)/floor.txt
