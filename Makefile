# Two commands do all the set-up on a fresh machine (Python 3.11, gcc; nvcc optional):
#   make demo   the main job: the RHD hand-pose example on its built-in data
#   make test   the test suite (the same command CI runs)
# Both create the virtualenv $(VENV) and build the kernels first when needed.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.* csrc/cpu/capability/* csrc/cuda/*)
OUT ?= runs/demo
# CUDA architectures of the kernel build: setup.py's default (the visible GPUs', PTX of the newest) on
# a machine with a GPU; on one without (CI), Hopper alone, which keeps the build short. Set
# TORCH_CUDA_ARCH_LIST to build for other GPUs, e.g. `make install TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0+PTX"`.
ifeq ($(shell nvidia-smi -L 2>/dev/null),)
TORCH_CUDA_ARCH_LIST ?= 9.0+PTX
export TORCH_CUDA_ARCH_LIST
endif

.PHONY: install demo compare test test-slow bench clean

install: $(VENV)/.installed

# pip --quiet keeps pip's own chatter out; these lines say what the long steps are doing.
$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	@echo "gpoe_fusion: installing $(TORCH) into $(VENV)"
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet wheel
	@echo "gpoe_fusion: compiling the C++ kernels (about 3 minutes on 2 cores; first run and after source changes only)"
	@start=$$(date +%s); \
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation -e ".[test]" && \
	echo "gpoe_fusion: kernels built and installed in $$(( $$(date +%s) - start )) s"
	touch $@

demo: install
	$(PY) examples/handpose_rhd.py --out $(OUT)

compare: install
	$(PY) examples/handpose_rhd.py --compare --out runs/compare

test: install
	GPOE_FUSION_REQUIRE_EXTENSION=1 $(PY) -m pytest -q -m "not slow"

test-slow: install
	GPOE_FUSION_REQUIRE_EXTENSION=1 $(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/bench_fusion.py --quick

clean:
	rm -rf build gpoe_fusion/_C*.so *.egg-info
