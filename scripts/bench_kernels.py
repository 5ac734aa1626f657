"""CPU linear kernels on the real pair's shapes: torch's default path against what the ecosystem offers.

For each linear shape of the Qwen2.5-Coder 1.5B target and 0.5B draft, at 1, 5, 9 and 64 rows (a draft
step, verify passes of γ=4 and γ=8, a batch), in fp32 and bf16, one process, variants interleaved:

- ``default``: ``F.linear`` (MKL sgemm in fp32; oneDNN matmul on an unpacked weight in bf16);
- ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` on a weight packed once (``_reorder_linear_weight``),
  what ``model.cpu_kernels=onednn`` runs (``selfjudge.kernels``);
- ``mkldnn_tensor``: ``torch.utils.mkldnn.to_mkldnn`` (a oneDNN-layout weight, input converted per call);
- ``mkl_packed`` (fp32): ``torch.ops.mkl._mkl_linear`` on an MKL-packed weight (inductor's fp32 path);
- ``compile`` / ``compile_autotune``: ``torch.compile`` (inductor, frozen weights), default mode on the
  target's MLP shapes and ``max-autotune-no-cudagraphs`` (cpp GEMM templates) on its up projection
  (compiling takes seconds to a minute each);
- ``*_2t``: ``default`` and ``onednn`` with 2 threads instead of 1.

Then one whole-model step of the target (a 1-token decode step and a 9-token verify pass over a 64-token
KV cache) with default kernels against oneDNN, fp32 and bf16. The model is the target's architecture
(Qwen2 config of Qwen2.5-Coder-1.5B) with random weights: timing does not depend on weight values, and
the bench needs no model download.

    python scripts/bench_kernels.py --out docs/bench/bench_kernels.json
    python scripts/bench_kernels.py --quick       # fewer shapes and repeats: a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.mkldnn  # torch.utils.mkldnn.to_mkldnn

from selfjudge.io import code_version, write_json
from selfjudge.kernels import onednn_linear, pack_weight, use_onednn

# (model, layer, out_features, in_features): Qwen2.5-Coder-1.5B (hidden 1536, MLP 8960, KV 256) and 0.5B
SHAPES = [
    ("target", "q/o_proj", 1536, 1536),
    ("target", "k/v_proj", 256, 1536),
    ("target", "gate/up_proj", 8960, 1536),
    ("target", "down_proj", 1536, 8960),
    ("target", "lm_head", 151936, 1536),
    ("draft", "q/o_proj", 896, 896),
    ("draft", "gate/up_proj", 4864, 896),
    ("draft", "down_proj", 896, 4864),
    ("draft", "lm_head", 151936, 896),
]
COMPILED = {"gate/up_proj", "down_proj"}  # torch.compile on the target's MLP shapes
AUTOTUNED = {"gate/up_proj"}  # max-autotune on the largest one only (compiling takes long)
ROWS = (1, 5, 9, 64)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def machine() -> dict:
    caps = torch.cpu.get_capabilities()
    flags = sorted(f for f in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni") if caps.get(f))
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        model = ""
    return {
        "cpu": model or caps.get("cpu_name"),
        "cores": os.cpu_count(),
        "flags": flags,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _time(fn, reps: int) -> list[float]:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def _variants(w: torch.Tensor, x: torch.Tensor, compile_modes: list[str]) -> dict:
    """name -> (callable, threads). Each packed weight is built once per shape and dtype."""
    out = {}
    packed = pack_weight(w)
    out["default"] = (lambda: F.linear(x, w), 1)
    out["onednn"] = (lambda: onednn_linear(x, packed), 1)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    lin.weight.data = w
    mk = torch.utils.mkldnn.to_mkldnn(lin, w.dtype)
    out["mkldnn_tensor"] = (lambda: mk(x), 1)
    if w.dtype == torch.float32:
        mp = torch.ops.mkl._mkl_reorder_linear_weight(w, x.shape[0])
        out["mkl_packed"] = (lambda: torch.ops.mkl._mkl_linear(x, mp, w, None, x.shape[0]), 1)
    for mode in compile_modes:
        name = "compile" if mode == "default" else "compile_autotune"
        fn = torch.compile(lin, mode=None if mode == "default" else mode, dynamic=False)
        t0 = time.perf_counter()
        fn(x)
        out[name] = (lambda fn=fn: fn(x), 1)
        out[name + "_compile_s"] = time.perf_counter() - t0
    out["default_2t"] = (out["default"][0], 2)
    out["onednn_2t"] = (out["onednn"][0], 2)
    return out


def bench_linears(shapes, rows, dtypes, reps: int, compile_modes: list[str]) -> list[dict]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights as constants: inductor picks packed MKL/oneDNN or cpp GEMMs
    results = []
    g = torch.Generator().manual_seed(0)
    for dname, dt in dtypes.items():
        for model, layer, n, k in shapes:
            w = (torch.randn(n, k, generator=g) * 0.02).to(dt)
            for m in rows:
                x = torch.randn(m, k, generator=g).to(dt)
                modes = [
                    md
                    for md in compile_modes
                    if model == "target" and layer in COMPILED and (md == "default" or layer in AUTOTUNED)
                ]
                with torch.no_grad():  # not inference_mode: inductor's freezing refuses inference tensors
                    v = _variants(w, x, modes)
                    fns = {name: f for name, f in v.items() if not name.endswith("_compile_s")}
                    samples = {name: [] for name in fns}
                    for _name, (fn, th) in fns.items():  # warm-up
                        torch.set_num_threads(th)
                        fn()
                    for _ in range(reps):  # interleaved: one call of each variant per round
                        for name, (fn, th) in fns.items():
                            torch.set_num_threads(th)
                            samples[name] += _time(fn, 1)
                    torch.set_num_threads(1)
                med = {name: round(statistics.median(s), 3) for name, s in samples.items()}
                best_ms = {name: round(min(s), 3) for name, s in samples.items()}
                row = {
                    "model": model,
                    "layer": layer,
                    "shape": [n, k],
                    "rows": m,
                    "dtype": dname,
                    "ms_min": best_ms,
                    "ms_median": med,
                    "vs_default": {name: round(best_ms["default"] / t, 2) for name, t in best_ms.items()},
                    "load": loadavg(),
                }
                row.update({name: round(t, 1) for name, t in v.items() if name.endswith("_compile_s")})
                results.append(row)
                best = min(best_ms, key=best_ms.get)
                print(
                    f"{dname:8s} {model:6s} {layer:12s} {n:6d}x{k:<5d} rows {m:2d}  "
                    + "  ".join(f"{name} {t:.2f}" for name, t in best_ms.items())
                    + f"  | best {best} {best_ms['default'] / best_ms[best]:.2f}x  load {row['load'][0]}",
                    flush=True,
                )
                torch._dynamo.reset()
    return results


def target_model(dtype: torch.dtype, layers: int | None = None):
    """Qwen2.5-Coder-1.5B-Instruct's architecture with random weights (timing does not depend on values)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=layers or 28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    return model.eval().requires_grad_(False)


def bench_steps(dtypes, reps: int, layers: int | None, prompt: int = 64) -> list[dict]:
    """A 1-token decode step and a 9-token verify pass of the target, default kernels, then oneDNN.

    One model in memory at a time (fp32: 6 GB): timed with default kernels, then its linears are swapped
    for packed oneDNN ones in place and timed again (blocks, not interleaved; min over repeats)."""
    from transformers import DynamicCache

    out = []
    for dname, dt in dtypes.items():
        model = target_model(dt, layers)
        ids = torch.randint(0, 151936, (1, prompt + 9), generator=torch.Generator().manual_seed(1))
        times: dict[str, dict[int, list[float]]] = {}
        loads = {}
        for kind in ("default", "onednn"):
            if kind == "onednn":
                use_onednn(model)
            times[kind] = {1: [], 9: []}
            with torch.inference_mode():
                c = DynamicCache(config=model.config)
                model(input_ids=ids[:, :prompt], cache=c, use_cache=True)
                for r in range(reps + 1):  # round 0 is a warm-up
                    for width in (1, 9):
                        t0 = time.perf_counter()
                        model(input_ids=ids[:, prompt : prompt + width], cache=c, use_cache=True)
                        dt_ms = (time.perf_counter() - t0) * 1e3
                        c.crop(-width)  # back to the prompt: every pass reads the same cache
                        if r:
                            times[kind][width].append(dt_ms)
            loads[kind] = loadavg()
        kinds = ("default", "onednn")
        for width in (1, 9):
            med = {k: round(statistics.median(times[k][width]), 1) for k in kinds}
            lo = {k: round(min(times[k][width]), 1) for k in kinds}
            row = {
                "what": f"target {'decode step' if width == 1 else 'verify pass'} ({width} tokens)",
                "tokens": width,
                "dtype": dname,
                "layers": layers or 28,
                "ms_min": lo,
                "ms_median": med,
                "vs_default": {k: round(lo["default"] / t, 2) for k, t in lo.items()},
                "load": loads,
            }
            out.append(row)
            print(
                f"{dname:8s} {row['what']:32s} "
                + "  ".join(f"{k} {t:.1f} ms" for k, t in lo.items())
                + f"  onednn {row['vs_default']['onednn']:.2f}x  load {loads}",
                flush=True,
            )
        del model
    return out


VARIANTS = (
    "default",
    "onednn",
    "mkldnn_tensor",
    "mkl_packed",
    "compile",
    "compile_autotune",
    "default_2t",
    "onednn_2t",
)


def markdown(result: dict) -> str:
    """The tables of docs/benchmarks.md from a bench_kernels.json."""
    cols = [v for v in VARIANTS if any(v in r["ms_min"] for r in result["linears"])]
    lines = [
        "| dtype | model | layer | shape | rows | " + " | ".join(cols) + " | oneDNN vs default |",
        "|---|---|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    for r in result["linears"]:
        ms = r["ms_min"]
        cells = [f"{ms[c]:.2f}" if c in ms else "" for c in cols]
        lines.append(
            f"| {r['dtype']} | {r['model']} | {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | "
            + " | ".join(cells)
            + f" | {r['vs_default']['onednn']:.2f}x |"
        )
    lines += [
        "",
        "| dtype | pass | default (ms) | oneDNN (ms) | oneDNN vs default | load (default / oneDNN) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["steps"]:
        lines.append(
            f"| {r['dtype']} | {r['what']} | {r['ms_min']['default']:.1f} | {r['ms_min']['onednn']:.1f} | "
            f"{r['vs_default']['onednn']:.2f}x | {r['load']['default'][0]} / {r['load']['onednn'][0]} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15, help="timed calls per variant (median)")
    ap.add_argument("--step-reps", type=int, default=8, help="timed whole-model steps per kind")
    ap.add_argument("--quick", action="store_true", help="MLP shapes only, 5 repeats, no compile, 4 layers")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-autotune", action="store_true", help="skip max-autotune-no-cudagraphs")
    ap.add_argument("--out", default=None, help="JSON output (e.g. docs/bench/bench_kernels.json)")
    ap.add_argument("--table", default=None, help="print the markdown tables of an earlier JSON output and exit")
    a = ap.parse_args()
    if a.table:
        print(markdown(json.loads(Path(a.table).read_text())))
        return
    torch.set_num_threads(1)
    shapes = [s for s in SHAPES if s[1] in COMPILED] if a.quick else SHAPES
    reps = 5 if a.quick else a.reps
    modes = [] if (a.quick or a.no_compile) else ["default"] + ([] if a.no_autotune else ["max-autotune-no-cudagraphs"])
    info = machine()
    print(
        f"CPU {info['cpu']}, {info['cores']} cores, flags {' '.join(info['flags'])}, torch {info['torch']} "
        f"({info['torch_cpu_capability']}); load {loadavg()}",
        flush=True,
    )
    t0 = time.perf_counter()
    linears = bench_linears(shapes, ROWS, DTYPES, reps, modes)
    steps = bench_steps(DTYPES, 3 if a.quick else a.step_reps, 4 if a.quick else None)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": info,
        "command": "python scripts/bench_kernels.py" + (" --quick" if a.quick else ""),
        "threads": "1 unless the variant ends in _2t",
        "reps": reps,
        "statistic": "ms_min (ratios) and ms_median over interleaved repeats: the machine is shared",
        "linears": linears,
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "load_end": loadavg(),
        "code_version": code_version(),
    }
    if a.out:
        write_json(Path(a.out), result)
        print(f"wrote {a.out}")
    else:
        print(json.dumps(result["steps"], indent=1))


if __name__ == "__main__":
    main()
