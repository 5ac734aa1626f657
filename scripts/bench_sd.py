"""Speed of our decoding methods against transformers' assisted generation and target-only decoding.

Methods (``--methods``, comma list): ``target`` (target alone), ``sd@G`` (lossless SD, fixed window G),
``adaptive`` (lossless SD, window chosen per round from measured costs, up to ``--max-gamma``;
:mod:`selfjudge.schedule`), ``adaptive_cs`` (the same plus the draft confidence stop
``--confidence-stop``), ``hf@G`` (transformers assisted generation, window fixed to G), ``hf_dynamic``
(assisted generation with the library's defaults: 20 tokens, confidence threshold 0.4), ``hf_target``.
Same prompts, same token counting (new tokens up to and including the first EOS), one process, methods
interleaved per prompt (the order alternates) so that load drift hits all alike; one warm-up prompt
decoded by every method first and excluded. The adaptive schedule keeps one set of estimates for the
whole run, the warm-up included. CPU flags, dtype, threads and load average go into the JSON.

    python scripts/bench_sd.py --gsm8k ../shared/data/gsm8k --prompts 6 --max-new-tokens 128 \\
        --methods target,sd@2,sd@4,sd@8,adaptive,hf@4,hf_dynamic --threads 2
    python scripts/bench_sd.py model=tiny --prompts 2 --methods target,sd@4,adaptive   # hydra overrides

HF assisted generation reads its window from the DRAFT's generation_config: ``hf@G`` sets
num_assistant_tokens=G, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0;
``hf_dynamic`` clears the three (the library's defaults apply).

The ``hf*`` methods run on our loaded modules, with the CPU kernels ``model.cpu_kernels`` chose for them:
that compares the decoding engines alone. ``hfu@G``, ``hfu_dynamic`` and ``hfu_target`` run the same
calls on a second copy of the pair loaded with ``model.cpu_kernels=default``: transformers as a user
gets it out of the box (one more load, the pair's memory twice).

Any method with the suffix ``+int8`` (``sd@4+int8``, ``adaptive+int8``, ``hf@4+int8``) runs with a second
copy of the draft loaded with ``model.draft.quantize=int8`` (int8 linears, :func:`selfjudge.kernels.quantize_int8`):
the same target, and for ``hf`` the same quantized module handed to transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from selfjudge.decoding import decode
from selfjudge.io import code_version, write_json
from selfjudge.models import load_model, model_parts
from selfjudge.schedule import AdaptiveWindow

from bench_common import cpu_flags, load_pair_and_prompts

HF_KEYS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


def _hf(pair, ids: list[int], n: int, **kw) -> tuple[list[int], float]:
    dev = next(pair.target.parameters()).device
    x = torch.tensor([ids], device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = pair.target.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=pair.eos_ids,
        pad_token_id=pair.eos_ids[0],
        temperature=None,
        top_p=None,
        top_k=None,
        **kw,
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    toks = out[0, len(ids) :].tolist()
    for k, t in enumerate(toks):
        if t in pair.eos_ids:
            toks = toks[: k + 1]
            break
    return toks, secs


def _hf_assisted(pair, ids: list[int], n: int, gamma: int | None) -> tuple[list[int], float]:
    cfg = pair.draft.generation_config
    for key, value in zip(HF_KEYS, (gamma, "constant", 0.0) if gamma else (None, None, None)):
        setattr(cfg, key, value)
    return _hf(pair, ids, n, assistant_model=pair.draft)


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6, help="timed prompts")
    ap.add_argument("--gsm8k", default=None, help="folder of a local GSM8K copy (test.jsonl); else GSM-Symbolic")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--methods", default="target,sd@2,sd@4,sd@8,adaptive,hf@4,hf_dynamic", help="comma list")
    ap.add_argument("--max-gamma", type=int, default=8, help="largest window of the adaptive schedule")
    ap.add_argument("--confidence-stop", type=float, default=0.4, help="adaptive_cs: draft confidence stop")
    ap.add_argument("--repeats", type=int, default=1, help="passes over the prompts")
    ap.add_argument("--warmup-tokens", type=int, default=16, help="new tokens of the warm-up decodes (excluded)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default="docs/bench/bench_sd.json", help="JSON result file")
    ap.add_argument(
        "overrides", nargs="*", help="hydra overrides of conf/selfjudge.yaml (default model=qwen_coder_offline)"
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    plain, pair, t_load, prompts = load_pair_and_prompts(a.overrides, a.prompts + 1, a.gsm8k)  # + the warm-up
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    kw = dict(eos_ids=pair.eos_ids, vocab=pair.vocab_size)
    hf_defaults = {k: getattr(pair.draft.generation_config, k, None) for k in HF_KEYS}
    schedules = {"adaptive": AdaptiveWindow(a.max_gamma), "adaptive_cs": AdaptiveWindow(a.max_gamma)}

    schedules.update({f"{k}+int8": AdaptiveWindow(a.max_gamma) for k in list(schedules)})

    def ours(p, m: str, ids: list[int], n: int, schedule: AdaptiveWindow | None) -> tuple[list[int], float]:
        if m == "target":
            toks, st = decode(p.target, None, ids, gamma=0, max_new_tokens=n, **kw)
        elif m.startswith("sd@"):
            toks, st = decode(p.target, p.draft, ids, gamma=int(m[3:]), max_new_tokens=n, **kw)
        else:
            toks, st = decode(
                p.target,
                p.draft,
                ids,
                gamma=a.max_gamma,
                max_new_tokens=n,
                schedule=schedule,
                confidence_stop=a.confidence_stop if m == "adaptive_cs" else None,
                **kw,
            )
        return toks, st.seconds

    int8_pair = None
    if any(m.endswith("+int8") for m in methods):  # the same target, the draft loaded again as int8
        _, spec, opts = model_parts(plain["model"])
        q_draft, q_info = load_model(dataclasses.replace(spec, quantize="int8"), opts, "draft")
        int8_pair = dataclasses.replace(pair, draft=q_draft, draft_info=q_info)

    plain_pair = None
    if any(m.startswith("hfu") for m in methods):  # transformers as a user gets it: torch's own kernels
        plain_pair = load_pair_and_prompts([*a.overrides, "model.cpu_kernels=default"], 1, a.gsm8k)[1]

    def run(name: str, ids: list[int], n: int) -> tuple[list[int], float]:
        p = plain_pair if name.startswith("hfu") else int8_pair if name.endswith("+int8") else pair
        m = name.replace("hfu", "hf", 1).removesuffix("+int8")
        if m.startswith("hf@"):
            return _hf_assisted(p, ids, n, int(m[3:]))
        if m == "hf_dynamic":
            return _hf_assisted(p, ids, n, None)
        if m == "hf_target":
            return _hf(p, ids, n)
        if m in ("target", "adaptive", "adaptive_cs") or re.fullmatch(r"sd@\d+", m):
            return ours(p, m, ids, n, schedules.get(name))
        raise SystemExit(f"unknown method '{name}' in --methods")

    for m in methods:  # warm-up (excluded; the adaptive schedules measure their first costs here)
        run(m, prompts[0], a.warmup_tokens)
    # forward calls and positions read by each model body, per method: shows re-reads and round counts
    reads = {"target": [0, 0], "draft": [0, 0]}
    drafts = [("draft", pair.draft)] + ([("draft", int8_pair.draft)] if int8_pair else [])
    for role, model in [("target", pair.target), *drafts]:
        body = getattr(model, model.base_model_prefix)
        body.register_forward_pre_hook(
            lambda mod, args, kw, r=reads[role]: r.__setitem__(
                slice(0, 2),
                [r[0] + 1, r[1] + (kw.get("input_ids") if kw.get("input_ids") is not None else args[0]).shape[1]],
            ),
            with_kwargs=True,
        )
    res: dict[str, dict] = {
        m: {
            "tokens": 0,
            "seconds": 0.0,
            "per_prompt": [],
            "target_calls": 0,
            "target_positions": 0,
            "draft_calls": 0,
            "draft_positions": 0,
        }
        for m in methods
    }
    outputs: dict[str, list[list[int]]] = {m: [] for m in methods}
    meta = dict(t_load=t_load, load0=os.getloadavg(), hf_defaults=hf_defaults, schedules=schedules)
    for rep in range(a.repeats):
        for i, ids in enumerate(prompts[1:]):
            for m in methods if (i + rep) % 2 == 0 else methods[::-1]:  # alternate the order too
                before = [*reads["target"], *reads["draft"]]
                toks, secs = run(m, ids, a.max_new_tokens)
                after = [*reads["target"], *reads["draft"]]
                for k, key in enumerate(("target_calls", "target_positions", "draft_calls", "draft_positions")):
                    res[m][key] += after[k] - before[k]
                res[m]["tokens"] += len(toks)
                res[m]["seconds"] += secs
                res[m]["per_prompt"].append(
                    {
                        "prompt": i,
                        "tokens": len(toks),
                        "seconds": round(secs, 4),
                        "tokens_per_s": round(len(toks) / secs, 3),
                    }
                )
                if rep == 0:
                    outputs[m].append(toks)
                print(
                    f"[bench] prompt {i} {m:12s} {len(toks):4d} tok {secs:7.2f} s {len(toks) / secs:7.2f} tok/s "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
            _write(a, pair, plain, prompts, methods, res, outputs, meta, done=False)
    _write(a, pair, plain, prompts, methods, res, outputs, meta, done=True)


def _ratios(res: dict) -> dict:
    tps = {m: r["tokens_per_s"] for m, r in res.items()}
    out = {}
    fixed = {m: v for m, v in tps.items() if m.startswith("sd@") and not m.endswith("+int8")}
    hfs = [x for x in tps if x.startswith(("hf@", "hfu@")) and not x.endswith("+int8")]
    for m in ("adaptive", "adaptive_cs", *fixed, "hf_dynamic", "hfu_dynamic", *hfs):
        if m in tps and "target" in tps:
            out[f"{m}/target"] = tps[m] / tps["target"]
    for m in ("adaptive", "adaptive_cs"):
        if m in tps and fixed:
            best = max(fixed, key=fixed.get)
            out[f"{m}/best_fixed({best})"] = tps[m] / fixed[best]
        for h in ("hf_dynamic", "hfu_dynamic", *hfs):
            if m in tps and h in tps:
                out[f"{m}/{h}"] = tps[m] / tps[h]
    for s in fixed:
        for h in ("hf@" + s[3:], "hfu@" + s[3:]):
            if h in tps:
                out[f"{s}/{h}"] = tps[s] / tps[h]
    for h in ("hf_target", "hfu_target"):
        if "target" in tps and h in tps:
            out[f"target/{h}"] = tps["target"] / tps[h]
    for m in (x for x in tps if x.endswith("+int8")):  # the int8 draft against the same method's own draft
        base = m.removesuffix("+int8")
        for other in ("target", base, *(["hf@" + base[3:] + "+int8"] if base.startswith("sd@") else [])):
            if other in tps:
                out[f"{m}/{other}"] = tps[m] / tps[other]
    return out


def _write(a, pair, plain, prompts, methods, res, outputs, meta, done: bool) -> None:
    """Summarise what has been measured so far (a run cut short still leaves its numbers)."""
    res = {m: dict(r) for m, r in res.items() if r["seconds"] > 0}
    methods = [m for m in methods if m in res]
    if not methods:
        return
    for m in methods:
        r = res[m]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["median_prompt_tokens_per_s"] = statistics.median(p["tokens_per_s"] for p in r["per_prompt"])
    ratios = _ratios(res)
    agree = {}
    if "target" in outputs:
        for m in methods:
            pairs = list(zip(outputs[m], outputs["target"]))
            agree[m] = {
                "exact": sum(o == r for o, r in pairs) / len(pairs),
                "prefix": sum(_prefix(o, r) / max(1, len(r)) for o, r in pairs) / len(pairs),
            }
    scheds = {}
    for name, s in meta["schedules"].items():
        if name in methods:
            hist = {g: s.chosen.count(g) for g in sorted(set(s.chosen))}
            scheds[name] = {
                "windows_chosen": hist,
                "alpha": round(s.alpha, 4),
                "draft_step_s": s.draft_cost,
                "verify_s_by_width": dict(sorted(s.verify_cost.items())),
            }
    model_cfg = plain["model"]
    summary = {
        "what": "tokens/s of target-only, our lossless SD (fixed windows, adaptive schedule) and transformers "
        "assisted generation (fixed window, library defaults), one process, methods interleaved",
        "target": pair.target_info.name,
        "draft": pair.draft_info.name,
        "dtype": str(next(pair.target.parameters()).dtype).replace("torch.", ""),
        "dtype_config": model_cfg.get("dtype"),
        "runtime": pair.runtime,  # the dtype and CPU kernels that ran, and why
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": str(next(pair.target.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_flags(),
        "prompts_source": "gsm8k test" if a.gsm8k else "gsm_symbolic",
        "max_new_tokens": a.max_new_tokens,
        "prompts": len(prompts) - 1,
        "repeats": a.repeats,
        "max_gamma": a.max_gamma,
        "confidence_stop": a.confidence_stop,
        "hf_draft_defaults": meta["hf_defaults"],
        "load_seconds": round(meta["t_load"], 2),
        "loadavg_start": meta["load0"],
        "loadavg_end": os.getloadavg(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "code_version": code_version(),
        "results": res,
        "ratios": ratios,
        "agreement_with_target": agree,
        "schedules": scheds,
        "complete": done,
    }
    if done:
        print(
            json.dumps(
                {
                    "ratios": ratios,
                    "tokens_per_s": {m: res[m]["tokens_per_s"] for m in methods},
                    "agreement_with_target": agree,
                    "schedules": scheds,
                    "cpu": summary["cpu"],
                    "dtype": summary["dtype"],
                    "kernels": summary["runtime"]["cpu_kernels"],
                    "loadavg": [summary["loadavg_start"], summary["loadavg_end"]],
                },
                indent=1,
            )
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, summary)


if __name__ == "__main__":
    main()
