# Quick start:  make demo       (the whole VersaT2I loop on the embedded demo world, CPU, nothing downloaded)
#               make test       (the whole test suite, what CI runs after make lint; COMFYUI_PATH=... adds
#                                the comfy and server tiers, skipped without it)
# Also:         make test-fast  (no ComfyUI tiers and no test marked slow: a few minutes)
#               make lint       (ruff check: lint and import order)
# All build .venv first: torch/torchvision pinned to the builds this project is tested with, then
# the pack with its test, lint and optional-scorer extras. ComfyUI users don't need this: see README.
# Test tiers are pytest markers (comfy, server, browser, family, slow): README, Testing.

PYTHON ?= python3.11
VENV ?= .venv
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,lint,iqa,geometry
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

# No venv yet and no $(PYTHON): stop with one line saying what to install (instead of a shell error
# in the middle of the recipe). `make clean` needs no Python.
ifeq ($(wildcard $(BIN)/python),)
ifneq ($(filter-out clean,$(or $(MAKECMDGOALS),venv)),)
ifeq ($(shell command -v $(PYTHON) 2>/dev/null),)
$(error $(PYTHON) not found on PATH: install Python 3.11 with its venv module (Debian/Ubuntu: apt-get install python3.11 python3.11-venv; else python.org) or pass PYTHON=/path/to/python3.11)
endif
endif
endif

.PHONY: venv comfy-deps test test-fast test-browser lint demo bench clean

venv: $(STAMP) comfy-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip
	# torch first and pinned; every later install is constrained to it so nothing re-resolves torch.
	$(BIN)/python -m pip install --disable-pip-version-check -q $(TORCH_PINS)
	printf '%s\n' $(TORCH_PINS) > $(VENV)/torch-constraints.txt
	# setuptools tells every editable install to beware of folders named like the package in the
	# working directory; there is none here (the package is the repository root, mapped to versat2i).
	PYTHONWARNINGS="ignore:Editable installation." \
	  $(BIN)/python -m pip install --disable-pip-version-check -q -c $(VENV)/torch-constraints.txt -e ".[$(EXTRAS)]"
	! $(BIN)/python -m pip show -q torchaudio 2>/dev/null  # torchaudio breaks peft/diffusers imports here
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# With COMFYUI_PATH set (a ComfyUI checkout outside this repo), the integration tests import it
# in-process and serve it with this venv's python, so its requirements go into the venv too
# (torchaudio excluded: it breaks imports here; `requests` is used but not listed by ComfyUI).
# ComfyUI 0.33 imports torchaudio when comfy.sd loads: when no torchaudio imports, an import-only
# stand-in is installed (tools/torchaudio_stand_in.py says why). Switching COMFYUI_PATH between
# versions reinstalls that version's pins (its frontend package among them).
comfy-deps: $(STAMP)
ifneq ($(strip $(COMFYUI_PATH)),)
	grep -viE '^[[:space:]]*torchaudio' "$(COMFYUI_PATH)/requirements.txt" > $(VENV)/comfy-requirements.txt
	echo requests >> $(VENV)/comfy-requirements.txt
	cmp -s $(VENV)/comfy-requirements.txt $(VENV)/comfy-requirements.installed || { \
	  $(BIN)/python -m pip install --disable-pip-version-check -q -c $(VENV)/torch-constraints.txt \
	    -r $(VENV)/comfy-requirements.txt && cp $(VENV)/comfy-requirements.txt $(VENV)/comfy-requirements.installed; }
	$(BIN)/python tools/torchaudio_stand_in.py
endif

# One thread per torch process: on 2 cores a second busy process otherwise makes torch 40-90x slower.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
# make test: every tier but the browser one (it needs a chromium and runs minutes per workflow).
# make test-fast: also no ComfyUI tier (comfy, server) and nothing over ~20 s (slow).
FAST_MARKERS = not slow and not comfy and not server and not browser

test: venv
	$(TEST_ENV) $(BIN)/python -m pytest -m "not browser" $(PYTEST_ARGS)

test-fast: venv
	$(TEST_ENV) $(BIN)/python -m pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# The shipped workflows in ComfyUI's own frontend, in a headless chromium (Debian: apt-get install
# chromium; another one: VERSAT2I_CHROMIUM=/path/to/chrome). Needs COMFYUI_PATH; installs playwright
# (the Python package only: the browser is the system's). Screenshots go to docs/screenshots/.
test-browser: venv
	test -n "$(COMFYUI_PATH)" || { echo "set COMFYUI_PATH=/path/to/ComfyUI"; exit 2; }
	$(BIN)/python -c "import playwright" 2>/dev/null || \
	  $(BIN)/python -m pip install --disable-pip-version-check -q -c $(VENV)/torch-constraints.txt playwright
	$(TEST_ENV) VERSAT2I_SCREENSHOTS=$(CURDIR)/docs/screenshots \
	  $(BIN)/python -m pytest -m browser tests/browser $(PYTEST_ARGS)

demo: venv
	OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 $(BIN)/versat2i demo

bench: venv
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
