"""Time loading the default offline pair from the cache (and the first conversion when the cache is empty).

.venv/bin/python scripts/bench_load.py [--out docs/bench/bench_load.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import yaml

from selfjudge.io import write_json
from selfjudge.models import LoadOptions, ModelSpec, load_model, load_tokenizer, resolve_folder
from selfjudge.offline import is_complete


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/bench/bench_load.json")
    args = ap.parse_args()
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "conf/model/qwen_coder_offline.yaml").read_text())
    opts = LoadOptions(dtype=cfg["dtype"], device=cfg["device"], cache_dir=cfg["cache_dir"])
    res = {"load_average": os.getloadavg()}
    for role in ("target", "draft"):
        spec = ModelSpec(**cfg[role])
        t0 = time.perf_counter()
        where, _ = resolve_folder(spec, opts, role)  # converts on first use
        res[f"{role}_first_conversion_s"] = round(time.perf_counter() - t0, 2)
        assert is_complete(Path(where)), where
        t0 = time.perf_counter()
        load_model(spec, opts, role)
        res[f"{role}_cached_load_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        load_tokenizer(spec, opts, role)
        res[f"{role}_tokenizer_s"] = round(time.perf_counter() - t0, 2)
    print(res)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
