#!/usr/bin/env bash
# Multi-process judge training. Every launcher runs the same hydra entry (selfjudge.train.main);
# each rank gets its own hydra log folder (hydra.run.dir ends in -rank${RANK}).
#   scripts/train_multi.sh torchrun  2 run_dir=runs/qwen            # N CPU ranks (gloo) or GPUs (nccl)
#   scripts/train_multi.sh deepspeed 8 run_dir=runs/qwen train.device=cuda deepspeed=zero2
#   scripts/train_multi.sh python    1 run_dir=runs/qwen            # one process, free port picked itself
set -euo pipefail
launcher=${1:?torchrun|deepspeed|python}; n=${2:?processes}; shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank: oversubscribed CPUs are 10-100x slower
case "$launcher" in
  torchrun)  # rendezvous on a free port (--master_port=0 lets the OS pick)
    exec torchrun --standalone --nproc_per_node="$n" -m selfjudge.train.main "$@" ;;
  deepspeed) # --no_local_rank: hydra would reject the --local_rank=N argument deepspeed appends
    port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    exec deepspeed --no_local_rank --num_gpus "$n" --master_port "$port" --module selfjudge.train.main "$@" ;;
  python)
    exec python -m selfjudge.train.main "$@" ;;
  *) echo "unknown launcher '$launcher' (torchrun|deepspeed|python)" >&2; exit 2 ;;
esac
