"""Fast (packed windows over the generation's cached prefix) vs naive (full recompute per mismatch)
SelfJudge scoring on the real pair: speed in the configured dtype, largest score difference in fp32.

    python scripts/bench_scoring.py                       # model config qwen_coder_offline, 3 x 256 tokens
    python scripts/bench_scoring.py --model conf/model/tiny.yaml --new-tokens 64

The naive scorer costs one full forward per mismatch, so it is timed on the first ``--naive-mismatches``
mismatches of each response and extrapolated per mismatch (stated in the JSON). Warm-up excluded.
As in data_gen, the fast scorer reads the target's pass over x ⊕ y from the generation that made y
(its KV cache, chosen-token log-probs and hidden states): it runs one draft pass and the packed
windows. The naive scorer runs the draft pass, one target pass for Orig, and one pass per mismatch.
``fast_s_untraced`` times the fast scorer without the trace (it makes its own target pass first).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch
import yaml

from selfjudge.generation import greedy_batch_traced
from selfjudge.models import format_prompt, pair_from_mapping
from selfjudge.scoring import score_response, score_response_naive

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Janet has 16 eggs a day. She eats 3 for breakfast and bakes muffins with 4. She sells the rest at $2 each. "
    "How much does she make every day?",
    "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring and a test.",
    "A train leaves at 9:40 and travels 210 km at 84 km/h. When does it arrive? Explain step by step.",
]


def _load(model_cfg: dict, dtype: str):
    return pair_from_mapping({**model_cfg, "dtype": dtype})


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "conf/model/qwen_coder_offline.yaml"), help="model config YAML")
    ap.add_argument("--responses", type=int, default=3, help="number of responses (at most %d)" % len(PROMPTS))
    ap.add_argument("--new-tokens", type=int, default=256, help="response length")
    ap.add_argument("--window", type=int, default=20, help="LD window N")
    ap.add_argument(
        "--naive-mismatches", type=int, default=3, help="mismatches per response timed with the naive scorer"
    )
    ap.add_argument("--check-mismatches", type=int, default=3, help="mismatches per response compared in fp32")
    ap.add_argument("--out", default=str(REPO / "docs/bench/bench_scoring.json"), help="JSON summary")
    args = ap.parse_args()
    model_cfg = yaml.safe_load(Path(args.model).read_text())
    model_cfg.pop("description", None)

    pair = _load(model_cfg, model_cfg["dtype"])
    tok, V = pair.tokenizer, pair.vocab_size
    prompts = [format_prompt(tok, q) for q in PROMPTS[: args.responses]]
    greedy_batch_traced(pair.target, prompts, 4, pair.eos_ids, tok.pad_token_id, V)  # warm-up
    t_gen = time.perf_counter()
    resps, traces = greedy_batch_traced(pair.target, prompts, args.new_tokens, pair.eos_ids, tok.pad_token_id, V)
    t_gen = time.perf_counter() - t_gen
    print(f"generated {[len(r) for r in resps]} tokens in {t_gen:.1f}s ({model_cfg['dtype']}, traced)")
    score_response(pair.target, pair.draft, prompts[0][:32], resps[0][:32], V, args.window)  # warm-up

    timing = []
    for p, r, tr in zip(prompts, resps, traces):
        fast, t_fast = _timed(lambda: score_response(pair.target, pair.draft, p, r, V, args.window, trace=tr))
        _, t_untraced = _timed(lambda: score_response(pair.target, pair.draft, p, r, V, args.window))
        M, k = len(fast.positions), min(args.naive_mismatches, len(fast.positions))
        _, t_base = _timed(lambda: score_response_naive(pair.target, pair.draft, p, r, V, args.window, limit=0))
        _, t_k = _timed(lambda: score_response_naive(pair.target, pair.draft, p, r, V, args.window, limit=k))
        per_mismatch = (t_k - t_base) / max(1, k)
        t_naive = t_base + per_mismatch * M
        timing.append(
            {
                "prompt_tokens": len(p),
                "response_tokens": len(r),
                "mismatches": M,
                "fast_s": t_fast,
                "fast_s_untraced": t_untraced,
                "naive_base_s": t_base,
                "naive_timed_mismatches": k,
                "naive_s_per_mismatch": per_mismatch,
                "naive_s_extrapolated": t_naive,
                "speedup": t_naive / t_fast,
                "speedup_untraced": t_naive / t_untraced,
            }
        )
        print(
            f"  T={len(r)} M={M}: fast {t_fast:.2f}s (untraced {t_untraced:.2f}s), naive ~{t_naive:.1f}s "
            f"({k} timed, {per_mismatch:.2f}s each) -> {t_naive / t_fast:.1f}x ({t_naive / t_untraced:.1f}x untraced)"
        )
    dtype = model_cfg["dtype"]
    del pair
    gc.collect()

    pair32 = _load(model_cfg, "float32")  # fp32 responses and traces of their own: the check is exact there
    resps32, traces32 = greedy_batch_traced(
        pair32.target, prompts, args.new_tokens, pair32.eos_ids, pair32.tokenizer.pad_token_id, V
    )
    diffs = []
    for p, r, tr in zip(prompts, resps32, traces32):
        k = args.check_mismatches
        fast = score_response(pair32.target, pair32.draft, p, r, V, args.window, trace=tr)
        naive = score_response_naive(pair32.target, pair32.draft, p, r, V, args.window, limit=k)
        n = len(naive.positions)
        assert torch.equal(fast.positions[:n], naive.positions)
        diffs.append(
            {
                "mismatches_compared": n,
                "mismatches": len(fast.positions),
                "max_abs_ld_diff": float((fast.ld[:n] - naive.ld).abs().max()) if n else 0.0,
                "max_abs_orig_diff": float((fast.orig[:n] - naive.orig).abs().max()) if n else 0.0,
                "max_abs_feature_diff": float((fast.sub_features[:n] - naive.sub_features).abs().max()) if n else 0.0,
            }
        )
    total_fast = sum(t["fast_s"] for t in timing)
    total_naive = sum(t["naive_s_extrapolated"] for t in timing)
    summary = {
        "model_config": Path(args.model).name,
        "dtype_timing": dtype,
        "dtype_diff_check": "float32",
        "window": args.window,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "generation_s": t_gen,
        "note": "naive time extrapolated per mismatch from the first naive_timed_mismatches of each response",
        "speedup": total_naive / total_fast,
        "fast_s_total": total_fast,
        "naive_s_total_extrapolated": total_naive,
        "speedup_untraced": total_naive / sum(t["fast_s_untraced"] for t in timing),
        "load_average_1_5_15": list(os.getloadavg()),
        "mismatches_total": sum(t["mismatches"] for t in timing),
        "max_abs_ld_diff_fp32": max(d["max_abs_ld_diff"] for d in diffs),
        "per_response_timing": timing,
        "per_response_fp32_check": diffs,
        "prompts": prompts,
        "responses": resps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"speedup {summary['speedup']:.1f}x per response (fast {total_fast:.1f}s vs naive ~{total_naive:.1f}s; "
        f"{summary['speedup_untraced']:.1f}x without the generation trace), "
        f"max |LD diff| fp32 {summary['max_abs_ld_diff_fp32']:.2e} -> {args.out}"
    )


if __name__ == "__main__":
    main()
