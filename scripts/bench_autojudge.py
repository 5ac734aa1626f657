"""AutoJudge regenerations: prefix cut from the generation's cache vs a fresh prefill, same swaps, same process.

    python scripts/bench_autojudge.py --out docs/bench/autojudge_regen.json          # real pair (qwen_coder_offline)
    python scripts/bench_autojudge.py --overrides model=tiny --tokens 48              # the tiny pair (seconds)

Generates the target's greedy responses (traced, as data_gen's fast scorer does), finds each response's
mismatches, spreads ``--mismatches`` swaps over each, and regenerates every swap twice in batches of
``--batch-size``: once with the prefill of x ⊕ y_<i cut from the response's own cache (what data_gen does
since the regenerations got the cache) and once computing it (before). The cached run goes first, so a
warm-up cost would count against it. Reports both times, their ratio, and how many regenerations came out
token-identical (in bf16 the two prefills differ in rounding, so a near-tie can flip a token).
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import load_pair_and_prompts, run_facts, write_result

from selfjudge.autojudge import AutoJudgeSettings, regenerate, chosen
from selfjudge.generation import greedy_batch_traced
from selfjudge.scoring import score_response


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overrides", nargs="*", default=[], help="hydra overrides (default model: qwen_coder_offline)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=192, help="new tokens per response (and regeneration budget)")
    ap.add_argument("--mismatches", type=int, default=4, help="swaps per response, spread over its mismatches")
    ap.add_argument("--batch-size", type=int, default=16, help="regenerations per greedy batch")
    ap.add_argument("--gsm8k", default=None, help="a local GSM8K folder (test.jsonl); default GSM-Symbolic")
    ap.add_argument("--out", default=None, help="JSON output path")
    a = ap.parse_args()
    _, pair, t_load, prompts = load_pair_and_prompts(a.overrides, a.prompts, a.gsm8k)
    args = (pair.eos_ids, pair.tokenizer.pad_token_id, pair.vocab_size)
    t0 = time.perf_counter()
    resps, traces = greedy_batch_traced(pair.target, prompts, a.tokens, *args)
    t_gen = time.perf_counter() - t0
    swaps = []
    for x, y, tr in zip(prompts, resps, traces):
        sc = score_response(pair.target, pair.draft, x, y, pair.vocab_size, window=20, trace=tr)
        pos, dr = sc.positions.tolist(), sc.draft_tokens.tolist()
        swaps += [(x, y, pos[j], dr[j], tr.cache) for j in chosen(len(pos), a.mismatches, "spread")]
    s = AutoJudgeSettings(True, "independent", a.mismatches, a.tokens, "spread", a.batch_size)
    plain = [(*sw[:4], None) for sw in swaps]
    prefix_tokens = sum(len(x) + i for x, _, i, _, _ in swaps)
    runs = {}
    for name, todo in (("cut from the generation cache", swaps), ("fresh prefill", plain)):
        t0 = time.perf_counter()
        out = regenerate(pair, todo, s, a.tokens)
        runs[name] = (time.perf_counter() - t0, out)
        print(f"{name:30s} {runs[name][0]:8.1f} s for {len(todo)} regenerations", flush=True)
    (t_c, o_c), (t_p, o_p) = runs.values()
    same = sum(u == v for u, v in zip(o_c, o_p))
    print(f"fresh prefill / cut: {t_p / t_c:.2f}x; identical regenerations {same}/{len(swaps)}; "
          f"prefix tokens no longer prefilled {prefix_tokens}", flush=True)  # fmt: skip
    res = {
        "seconds_cut_from_cache": t_c,
        "seconds_fresh_prefill": t_p,
        "ratio_fresh_over_cut": t_p / t_c,
        "regenerations": len(swaps),
        "identical_regenerations": same,
        "prefix_tokens": prefix_tokens,
        "regenerated_tokens": sum(len(o) - i - 1 for o, (_, _, i, _, _) in zip(o_c, swaps)),
        "generation_seconds": t_gen,
        "prompts": a.prompts,
        "tokens": a.tokens,
        "mismatches": a.mismatches,
        "batch_size": a.batch_size,
        "overrides": a.overrides,
        **run_facts(pair),
        "load_seconds": t_load,
    }
    write_result(a.out, res)


if __name__ == "__main__":
    main()
