#!/usr/bin/env bash
# data_gen on N processes of one machine (GPUs or CPU ranks). Each rank takes every N-th prompt and
# writes its own shards; rank 0 writes the manifest when all are done. Extra args are hydra overrides.
#   bash scripts/data_gen_multi.sh 8 model=qwen25_7b_05b model.device=cuda run_dir=runs/qwen7b
#   bash scripts/data_gen_multi.sh 2 model=tiny run_dir=runs/cpu-check   # CPU check
set -euo pipefail
N=${1:?usage: data_gen_multi.sh NPROC [hydra overrides...]}; shift
cd "$(dirname "$0")/.."
PORT=${MASTER_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --nproc_per_node="$N" --master_port="$PORT" -m selfjudge.data_gen.main "$@"
