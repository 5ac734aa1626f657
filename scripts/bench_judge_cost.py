"""Cost of the judge per round as a share of the verify phase, per feature set, beside the KL rule.

    python scripts/bench_judge_cost.py                                   # real pair (qwen_coder_offline)
    python scripts/bench_judge_cost.py --overrides model=tiny --tokens 48 --out docs/bench/judge_cost_tiny.json
    python scripts/bench_judge_cost.py --batch --prompts 32 --tokens 24   # one batched decode of 32 rows, as in eval

Each feature set gets an MLP head (256 hidden) with random weights of the right input size (the cost
does not depend on the weights) and a cut of 0 < c < 1, so the rule runs every round; ``decode`` reports
``rule_seconds`` (the rule alone) and ``verify_seconds`` (target verify pass + acceptance), exactly the
eval's ``rule / verify`` column. Same prompts, same process; warm-up decode excluded. Rows marked "every
position" ask the rule about all γ proposed tokens of each row (``positionwise = False``), as rules ran
before the decoder passed them only the tokens the lossless test rejects.
"""

from __future__ import annotations

import argparse
import platform

from bench_common import load_pair_and_prompts, run_facts, write_result

from selfjudge.batch_decoding import decode_batch
from selfjudge.decoding import decode
from selfjudge.features import SCALARS, FeatureSpec
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.policies import JudgeRule, KLRule, build_policy

CHEAP = ("target_logp", "target_top1_logp", "target_gap")
SETS = {
    "h_i": FeatureSpec(),
    "h_i-1,h_i": FeatureSpec(state_offsets=(-1, 0)),
    "h_i-1,h_i+logp,top1,gap": FeatureSpec(state_offsets=(-1, 0), scalars=CHEAP),
    "h_i-1,h_i+all scalars": FeatureSpec(state_offsets=(-1, 0), scalars=SCALARS),
}
EVERY = ("h_i-1,h_i+logp,top1,gap", "h_i-1,h_i+all scalars")  # also timed judging every position


class EveryPosition(JudgeRule):
    """The judge asked about all γ proposed tokens of every row, also those the lossless test keeps (the way
    rules ran before the decoder passed them only the rejected tokens)."""

    positionwise = False


class KLEveryPosition(KLRule):
    positionwise = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overrides", nargs="*", default=[], help="hydra overrides (default model: qwen_coder_offline)")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per decode")
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--batch", action="store_true", help="decode the prompts as one batch (the eval's way)")
    ap.add_argument("--out", default=None, help="JSON output path")
    a = ap.parse_args()
    _, pair, t_load, prompts = load_pair_and_prompts(a.overrides, a.prompts)
    H, Hd = pair.target_info.hidden_size, pair.draft_info.hidden_size
    policies = {}
    for name, spec in SETS.items():
        head = (
            JudgeHead(JudgeConfig(kind="mlp", hidden_dim=256, feature_dim=spec.dim(H, Hd), features=spec.as_dict()))
            .init_weights(0)
            .eval()
        )
        policies[f"judge {name}"] = JudgeRule(0.5, head)
        if name in EVERY:
            policies[f"judge {name}, every position"] = EveryPosition(0.5, head)
    policies["kl rule"] = build_policy("kl", 0.5)
    policies["kl rule, every position"] = KLEveryPosition(0.5)
    policies["likelihood rule"] = build_policy("likelihood", 1.0)
    kw = {"gamma": a.gamma, "eos_ids": pair.eos_ids, "vocab": pair.vocab_size}
    if a.batch:
        kw["pad_id"] = pair.tokenizer.pad_token_id or 0

    def run(pol, n_tokens, ids_list):  # [DecodeStats] per prompt
        if a.batch:
            return [
                st
                for _, st in decode_batch(pair.target, pair.draft, ids_list, max_new_tokens=n_tokens, policy=pol, **kw)
            ]
        return [decode(pair.target, pair.draft, ids, max_new_tokens=n_tokens, policy=pol, **kw)[1] for ids in ids_list]

    run(policies["kl rule"], 8, prompts[:2])  # warm-up
    rows = {}
    for name, pol in policies.items():
        rule = verify = 0.0
        rounds = 0
        for st in run(pol, a.tokens, prompts):  # per row: its share of each batched round's times
            rule, verify, rounds = rule + st.rule_seconds, verify + st.verify_seconds, rounds + st.rounds
        rows[name] = {
            "rule_share_of_verify": rule / verify,
            "rule_ms_per_round": 1e3 * rule / rounds,
            "verify_ms_per_round": 1e3 * verify / rounds,
            "rounds": rounds,
        }
        print(
            f"{name:28s} rule/verify {100 * rule / verify:6.2f} %   rule {1e3 * rule / rounds:8.2f} ms/round   "
            f"verify {1e3 * verify / rounds:9.1f} ms/round",
            flush=True,
        )
    res = {
        "rows": rows,
        "gamma": a.gamma,
        "tokens": a.tokens,
        "prompts": a.prompts,
        "batched": a.batch,
        "overrides": a.overrides,
        **run_facts(pair),
        "machine": platform.machine(),
        "load_seconds": t_load,
    }
    write_result(a.out, res)


if __name__ == "__main__":
    main()
