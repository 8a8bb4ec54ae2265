# make test  - set up .venv if missing (CPU torch pinned when there is no CUDA) and run the tests
# make demo  - the default GRPO job: two CPU ranks through the deepspeed launcher, tiny model
# make gpu-check - on a GPU machine, first: conformance tests (-m cuda) + GPU bench presets -> docs/gpu-check.md
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo bench install clean gpu-check

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

demo: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus 2 launch/train.py \
		--ds_config ds_configs/zero3_cpu.json --output_dir outputs/demo

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
