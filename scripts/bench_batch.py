"""Throughput of batched decoding: target-only and lossless SD at several batch sizes, same prompts.

For each batch size the prompts are split into batches of that size (similar lengths together) and
decoded by ``selfjudge.batch_decoding.decode_batch`` (batch size 1: ``selfjudge.decoding.decode``).
Reports tokens/s over all prompts, the ratio to batch-1 target-only decoding, the SD speedup over
target-only at the same batch size, and the mean accepted length (which batching must not change).
One warm-up batch per (method, batch size) is excluded.

    python scripts/bench_batch.py --prompts 16 --batch-sizes 1,4,16 --gamma 8 --max-new-tokens 64
    python scripts/bench_batch.py model=tiny --prompts 4 --batch-sizes 1,2   # hydra overrides pick the pair
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from selfjudge.batch_decoding import decode_batch
from selfjudge.decoding import decode
from selfjudge.generation import fixed_batches
from selfjudge.io import code_version, write_json

from bench_common import cpu_flags, load_pair_and_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="prompts (GSM-Symbolic problems, brief-answer prompt)")
    ap.add_argument("--batch-sizes", default="1,4,16", help="comma list")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default="docs/bench/bench_batch.json")
    ap.add_argument(
        "overrides", nargs="*", help="hydra overrides of conf/selfjudge.yaml (default model=qwen_coder_offline)"
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    plain, pair, _, prompts = load_pair_and_prompts(a.overrides, a.prompts)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    kw = dict(max_new_tokens=a.max_new_tokens, eos_ids=pair.eos_ids, vocab=pair.vocab_size)
    pad = pair.tokenizer.pad_token_id or 0

    def run(method: str, bs: int, idx: list[int], n: int | None = None):
        draft, gamma = (None, 0) if method == "target" else (pair.draft, a.gamma)
        args = {**kw, "max_new_tokens": n or a.max_new_tokens}
        if bs == 1:
            return [decode(pair.target, draft, prompts[i], gamma=gamma, **args) for i in idx]
        return decode_batch(pair.target, draft, [prompts[i] for i in idx], gamma=gamma, pad_id=pad, **args)

    load0 = os.getloadavg()
    res = {}
    for bs in sizes:
        for method in ("target", "sd"):
            run(method, bs, list(range(min(bs, len(prompts)))), 8)  # warm-up, excluded
            t0 = time.perf_counter()
            outs = [r for idx in fixed_batches([len(p) for p in prompts], bs) for r in run(method, bs, idx)]
            secs = time.perf_counter() - t0
            toks = sum(st.new_tokens for _, st in outs)
            rounds = sum(st.rounds for _, st in outs)
            res[f"{method}@{bs}"] = {
                "method": method,
                "batch_size": bs,
                "tokens": toks,
                "seconds": secs,
                "tokens_per_s": toks / secs,
                "mean_accepted_length": toks / rounds,
            }
            print(
                f"[bench_batch] {method:6s} batch {bs:3d}: {toks:6d} tok {secs:8.1f} s "
                f"{toks / secs:8.2f} tok/s  accepted length {toks / rounds:5.2f}",
                flush=True,
            )
    base = res[f"target@{sizes[0]}"]["tokens_per_s"]
    for r in res.values():
        r["vs_target_batch_%d" % sizes[0]] = r["tokens_per_s"] / base
        r["sd_speedup_same_batch"] = (
            r["tokens_per_s"] / res[f"target@{r['batch_size']}"]["tokens_per_s"] if r["method"] == "sd" else 1.0
        )
    summary = {
        "what": "tokens/s of target-only and lossless SD at several batch sizes, one process",
        "target": pair.target_info.name,
        "draft": pair.draft_info.name,
        "dtype": str(next(pair.target.parameters()).dtype).replace("torch.", ""),
        "dtype_config": plain["model"]["dtype"],
        "runtime": pair.runtime,  # the dtype and CPU kernels that ran, and why
        "cpu": cpu_flags(),
        "device": str(next(pair.target.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "gamma": a.gamma,
        "max_new_tokens": a.max_new_tokens,
        "prompts": len(prompts),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "code_version": code_version(),
        "results": res,
    }
    print(
        json.dumps(
            {
                k: {
                    x: round(v[x], 3)
                    for x in (
                        "tokens_per_s",
                        "vs_target_batch_%d" % sizes[0],
                        "sd_speedup_same_batch",
                        "mean_accepted_length",
                    )
                }
                for k, v in res.items()
            },
            indent=1,
        )
    )
    write_json(a.out, summary)


if __name__ == "__main__":
    main()
