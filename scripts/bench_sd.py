"""Speed of our lossless SD against transformers' assisted generation and target-only decoding.

Same prompts, same γ, same token counting (new tokens up to and including the first EOS), one
process, methods interleaved per prompt so machine-load drift hits all alike; one warm-up prompt
decoded by every method first and excluded.

    python scripts/bench_sd.py --prompts 4 --max-new-tokens 96 --gamma 4 --out docs/bench/bench_sd.json
    python scripts/bench_sd.py model=tiny --prompts 2        # trailing hydra overrides pick the pair

HF assisted generation reads its window from the DRAFT's generation_config: we fix it to γ with
num_assistant_tokens=γ, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from selfjudge.decoding import decode
from selfjudge.io import code_version, write_json

from bench_common import load_pair_and_prompts


def _hf_assisted(pair, ids: list[int], gamma: int, n: int) -> tuple[list[int], float]:
    cfg = pair.draft.generation_config
    cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold = gamma, "constant", 0.0
    return _hf(pair, ids, n, assistant_model=pair.draft)


def _hf(pair, ids: list[int], n: int, **kw) -> tuple[list[int], float]:
    dev = next(pair.target.parameters()).device
    x = torch.tensor([ids], device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = pair.target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                               eos_token_id=pair.eos_ids, pad_token_id=pair.eos_ids[0], temperature=None,
                               top_p=None, top_k=None, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    toks = out[0, len(ids):].tolist()
    for k, t in enumerate(toks):
        if t in pair.eos_ids:
            toks = toks[: k + 1]
            break
    return toks, secs


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="timed prompts (GSM-Symbolic test problems)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="new tokens per prompt")
    ap.add_argument("--gamma", type=int, default=4, help="draft window")
    ap.add_argument("--repeats", type=int, default=1, help="passes over the prompts")
    ap.add_argument("--warmup-tokens", type=int, default=8, help="new tokens of the warm-up decodes (excluded)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--methods", default="target,sd,hf_assisted", help="comma list of target,sd,hf_assisted,hf_target")
    ap.add_argument("--out", default="docs/bench/bench_sd.json", help="JSON result file")
    ap.add_argument("overrides", nargs="*", help="hydra overrides of conf/selfjudge.yaml (default model=qwen_coder_offline)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    plain, pair, t_load, prompts = load_pair_and_prompts(a.overrides, a.prompts + 1)  # + the warm-up prompt
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    kw = dict(eos_ids=pair.eos_ids, vocab=pair.vocab_size)
    run = {
        "target": lambda ids, n: _ours(decode(pair.target, None, ids, gamma=0, max_new_tokens=n, **kw)),
        "sd": lambda ids, n: _ours(decode(pair.target, pair.draft, ids, gamma=a.gamma, max_new_tokens=n, **kw)),
        "hf_assisted": lambda ids, n: _hf_assisted(pair, ids, a.gamma, n),
        "hf_target": lambda ids, n: _hf(pair, ids, n),
    }
    for m in methods:  # warm-up (excluded)
        run[m](prompts[0], a.warmup_tokens)
    # forward calls and positions read by each model body, per method: shows re-reads and round counts
    reads = {"target": [0, 0], "draft": [0, 0]}
    for role, model in (("target", pair.target), ("draft", pair.draft)):
        body = getattr(model, model.base_model_prefix)
        body.register_forward_pre_hook(lambda mod, args, kw, r=reads[role]: r.__setitem__(
            slice(0, 2), [r[0] + 1, r[1] + (kw.get("input_ids") if kw.get("input_ids") is not None else args[0]).shape[1]]),
            with_kwargs=True)
    res: dict[str, dict] = {m: {"tokens": 0, "seconds": 0.0, "per_prompt": [], "target_calls": 0, "target_positions": 0,
                                "draft_calls": 0, "draft_positions": 0} for m in methods}
    outputs: dict[str, list[list[int]]] = {m: [] for m in methods}
    load0 = os.getloadavg()
    for rep in range(a.repeats):
        for i, ids in enumerate(prompts[1:]):
            for m in (methods if (i + rep) % 2 == 0 else methods[::-1]):  # alternate the order too
                before = [*reads["target"], *reads["draft"]]
                toks, secs = run[m](ids, a.max_new_tokens)
                after = [*reads["target"], *reads["draft"]]
                for k, key in enumerate(("target_calls", "target_positions", "draft_calls", "draft_positions")):
                    res[m][key] += after[k] - before[k]
                res[m]["tokens"] += len(toks)
                res[m]["seconds"] += secs
                res[m]["per_prompt"].append({"prompt": i, "tokens": len(toks), "seconds": round(secs, 4),
                                             "tokens_per_s": round(len(toks) / secs, 3)})
                if rep == 0:
                    outputs[m].append(toks)
                print(f"[bench] prompt {i} {m:12s} {len(toks):4d} tok {secs:7.2f} s {len(toks) / secs:7.2f} tok/s", flush=True)
            _write(a, pair, plain, prompts, methods, res, outputs, load0, t_load, done=False)
    _write(a, pair, plain, prompts, methods, res, outputs, load0, t_load, done=True)


def _write(a, pair, plain, prompts, methods, res, outputs, load0, t_load, done: bool) -> None:
    """Summarise what has been measured so far (a run cut short still leaves its numbers)."""
    res = {m: dict(r) for m, r in res.items() if r["seconds"] > 0}
    methods = [m for m in methods if m in res]
    if not methods:
        return
    load1 = os.getloadavg()
    for m in methods:
        r = res[m]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        rates = [p["tokens_per_s"] for p in r["per_prompt"]]
        r["median_prompt_tokens_per_s"] = statistics.median(rates)
    ratios = {}
    for a_m, b_m in (("sd", "hf_assisted"), ("sd", "target"), ("hf_assisted", "target"), ("target", "hf_target")):
        if a_m in res and b_m in res:
            ratios[f"{a_m}/{b_m}"] = res[a_m]["tokens_per_s"] / res[b_m]["tokens_per_s"]
    agree = {}
    if "target" in outputs:
        for m in methods:
            pre = [_prefix(o, r) / max(1, len(r)) for o, r in zip(outputs[m], outputs["target"])]
            agree[m] = {"exact": sum(o == r for o, r in zip(outputs[m], outputs["target"])) / len(pre),
                        "prefix": sum(pre) / len(pre)}
    summary = {
        "what": "tokens/s of our lossless SD vs transformers assisted generation vs target-only, one process",
        "target": pair.target_info.name, "draft": pair.draft_info.name, "dtype": plain["model"]["dtype"],
        "device": str(next(pair.target.parameters()).device), "torch_threads": torch.get_num_threads(),
        "gamma": a.gamma, "max_new_tokens": a.max_new_tokens, "prompts": len(prompts) - 1, "repeats": a.repeats,
        "load_seconds": round(t_load, 2), "loadavg_start": load0, "loadavg_end": load1,
        "platform": platform.platform(), "torch": torch.__version__, "code_version": code_version(),
        "results": res, "ratios": ratios, "agreement_with_target": agree,
    }
    summary["complete"] = done
    if done:
        print(json.dumps({"ratios": ratios, "tokens_per_s": {m: res[m]["tokens_per_s"] for m in methods},
                          "agreement_with_target": agree, "loadavg": [load0, load1]}, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, summary)


def _ours(result) -> tuple[list[int], float]:
    toks, st = result
    return toks, st.seconds


if __name__ == "__main__":
    main()
