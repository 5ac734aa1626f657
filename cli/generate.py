"""selfjudge-generate: decode a prompt with a trained judge (or another acceptance rule) and stream the text.

Usage: selfjudge-generate key=value ...

  run_dir=runs/quickstart        a run folder: its model pair and judge/head (policy judge by default)
  model=qwen_coder_offline       a model preset instead of (or over) the run's pair (conf/model/)
  model.<key>=<value>            a top-level model setting: model.dtype=float32, model.device=cuda, model.cache_dir=...
  prompt="..."                   the prompt (required; chat template applied unless chat=false)
  judge=<folder or hub id>       a judge head other than run_dir/judge/head
  policy=judge                   judge | lossless | kl | typical | likelihood | topk | autojudge
  threshold=0.5                  the policy's threshold (judge: accept a mismatch iff P(important) < threshold)
  gamma=4                        draft tokens per round
  max_new_tokens=256             output length limit
  do_sample=false                sample (speculative sampling) instead of greedy
  temperature=1.0                sampling temperature (do_sample=true)
  seed=0                         sampling seed
  system="..."                   a system message
  chat=true                      apply the tokenizer's chat template
  static_cache=auto              static KV caches + CUDA graphs (auto: on for CUDA)

Examples:
  selfjudge-generate run_dir=runs/quickstart prompt="Natalia sold 48 clips in April..." threshold=0.3
  selfjudge-generate model=qwen_coder_offline policy=kl threshold=0.5 prompt="Write a haiku about rain"

The text streams to stdout round by round; a summary line (tokens, speed, accepted length) goes to stderr.
"""

from __future__ import annotations

import sys

KEYS = {
    "run_dir": str,
    "model": str,
    "prompt": str,
    "judge": str,
    "policy": str,
    "threshold": float,
    "gamma": int,
    "max_new_tokens": int,
    "do_sample": "bool",
    "temperature": float,
    "seed": int,
    "system": str,
    "chat": "bool",
    "static_cache": "auto",
}


def _bool(key: str, v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{key}={v}: expected true or false")


def parse(argv: list[str]) -> tuple[dict, dict]:
    """key=value arguments -> (options, model overrides); errors name the bad key."""
    opts: dict = {}
    model: dict = {}
    for arg in argv:
        key, sep, val = arg.partition("=")
        if not sep:
            raise ValueError(f"'{arg}' is not key=value (see --help)")
        if key.startswith("model."):
            sub = key.removeprefix("model.")
            if sub in ("target", "draft", "tiny"):
                raise ValueError(f"{key}: set whole-pair settings with model=<preset>, not {key}")
            model[sub] = None if val.lower() == "null" else val
            continue
        kind = KEYS.get(key)
        if kind is None:
            raise ValueError(f"unknown key '{key}'; known: {sorted(KEYS)} and model.<key>")
        try:
            if kind == "bool":
                opts[key] = _bool(key, val)
            elif kind == "auto":
                opts[key] = None if val.lower() == "auto" else _bool(key, val)
            else:
                opts[key] = kind(val)
        except ValueError as e:
            raise ValueError(f"{key}={val}: {e}") from None
    if "prompt" not in opts:
        raise ValueError("prompt=... is required")
    if "run_dir" not in opts and "model" not in opts:
        raise ValueError("pass run_dir=<a run folder> or model=<a preset such as qwen_coder_offline>")
    return opts, model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        opts, model = parse(argv)
    except ValueError as e:
        print(f"selfjudge-generate: {e}", file=sys.stderr)
        return 2
    from selfjudge.generate import load_generator

    load = {k: opts.pop(k) for k in ("run_dir", "model", "judge", "policy", "threshold") if k in opts}
    gen = load_generator(model_overrides=model, **load)
    prompt = opts.pop("prompt")
    text, st = gen(prompt, stream=lambda piece: print(piece, end="", flush=True), **opts)
    print(flush=True)
    rule = gen.rule.name + (f"@{gen.rule.threshold:g}" if gen.rule.threshold is not None else "")
    per_pass = st.new_tokens / st.rounds if st.rounds else 0.0
    print(
        f"[generate] {rule}: {st.new_tokens} tokens in {st.seconds:.2f} s "
        f"({st.new_tokens / max(st.seconds, 1e-9):.1f} tok/s), {st.rounds} target passes "
        f"({per_pass:.2f} tokens each)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
