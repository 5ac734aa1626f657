"""Acceptance policies: each rule equals its naive formula, strictest = lossless, loosest accepts all,
the judge reads the verify pass's own hidden states, heads that do not fit are refused."""

from __future__ import annotations

import math

import pytest
import torch

from selfjudge.decoding import RULE_CHUNK, Verification, apply_rule, decode, standard_accept
from selfjudge.features import FeatureSpec, forward_with_hidden, judge_features
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.models import format_prompt
from selfjudge.policies import (
    POLICIES,
    JudgeRule,
    KLRule,
    Policy,
    StrictTokens,
    build_policy,
    load_head,
    strict_token_mask,
    verify_features,
)

PROMPTS = ["how many apples", "janet sells eggs", "def sum list", "what is 12 * 7"]


def _head(pair, bias: float = 0.0, include_draft: bool = False, seed: int = 0) -> JudgeHead:
    H = pair.target_info.hidden_size
    dim = H + (pair.draft_info.hidden_size if include_draft else 0)
    head = JudgeHead(
        JudgeConfig(
            feature_dim=dim,
            target_model=pair.target_info.as_dict(),
            features={"layers": [-1], "include_draft": include_draft},
            thresholds={"quantiles": [0.2, 0.5, 0.8]},
        )
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        head.net.weight.normal_(0, 0.3)
        head.net.bias.fill_(bias)
    dev = next(pair.target.parameters()).device
    return head.to(dev).eval()


def _run(pair, ids, policy=None, gamma=4, n=40, **kw):
    return decode(
        pair.target,
        pair.draft,
        ids,
        gamma=gamma,
        max_new_tokens=n,
        eos_ids=pair.eos_ids,
        vocab=pair.vocab_size,
        policy=policy,
        **kw,
    )


def _rand_verification(g=5, V=40, T=0.0, seed=0) -> Verification:
    gen = torch.Generator().manual_seed(seed)
    tl = torch.randn(g + 1, V, generator=gen) * 2
    dl = tl[:-1] + torch.randn(g, V, generator=gen)
    d = torch.multinomial(torch.softmax(dl, -1), 1, generator=gen)[:, 0]
    return Verification(d, tl, torch.randn(g, 8, generator=gen), dl, torch.randn(g, 4, generator=gen), T)


def _acc(name, t, v, **kw) -> list[bool]:
    out = build_policy(name, t, **kw).accept(v)
    return [False] * v.draft_tokens.numel() if out is None else out.tolist()


@pytest.mark.parametrize("T", [0.0, 0.7])
def test_rules_equal_their_naive_formulas(T):
    for seed in range(5):
        v = _rand_verification(T=T, seed=seed)
        s = T if T > 0 else 1.0
        for j in range(v.draft_tokens.numel()):
            p = torch.softmax(v.target_logits[j].double() / s, -1).tolist()
            q = torch.softmax(v.draft_logits[j].double() / s, -1).tolist()
            d = int(v.draft_tokens[j])
            rank = sorted(range(len(p)), key=lambda i: -p[i]).index(d) + 1
            H = -sum(x * math.log(x) for x in p)
            kl = sum(b * math.log(b / a) for a, b in zip(p, q))
            for k in (1, 2, 5):
                assert _acc("topk", k, v)[j] == (k > 1 and rank <= k), (seed, j, k)
            for eps in (0.05, 0.3, 1.0):
                assert _acc("typical", eps, v)[j] == (p[d] > min(eps, math.sqrt(eps) * math.exp(-H)))
            for delta in (0.5, 2.0):
                assert _acc("likelihood", delta, v)[j] == (math.log(max(p)) - math.log(p[d]) < delta)
                assert _acc("kl", delta, v)[j] == (kl < delta and max(p) <= 0.9)


def test_rules_on_a_batch_of_proposals_equal_each_row_alone():
    """The batched decoder asks once for B proposals ([B, γ, ...]); each row must get its own answer."""
    rows = [_rand_verification(T=0.0, seed=s) for s in range(4)]
    stacked = Verification(
        *(
            torch.stack([getattr(v, f) for v in rows])
            for f in ("draft_tokens", "target_logits", "target_hidden", "draft_logits", "draft_hidden")
        ),
        0.0,
    )
    head = JudgeHead(JudgeConfig(feature_dim=8, target_model={}, features={"layers": [-1], "include_draft": False}))
    for name, t, kw in [
        ("topk", 3, {}),
        ("typical", 0.3, {}),
        ("likelihood", 1.0, {}),
        ("kl", 2.0, {}),
        ("judge", 0.5, {"head": head}),
    ]:
        want = [_acc(name, t, v, **kw) for v in rows]
        assert _acc(name, t, stacked, **kw) == want and any(map(any, want)), name


@pytest.mark.parametrize("T", [0.0, 0.7])
def test_rules_read_only_the_rejected_tokens_with_the_verdicts_of_whole_rows(T):
    """The decoder asks a rule about the tokens the lossless test rejects only, in chunks (position-wise rules):
    each verdict equals the rule's on the whole row, False where the test accepts; with nothing rejected, None.
    A rule that is not position-wise gets whole rows."""
    feats = {"layers": [-1], "include_draft": True, "state_offsets": [-1, 0], "scalars": ["target_logp", "kl"]}
    head = JudgeHead(JudgeConfig(feature_dim=8 + 8 + 4 + 2, target_model={}, features=feats))
    torch.manual_seed(0)
    with torch.no_grad():
        head.net.weight.normal_(0, 0.5)
    rows = []
    for seed in range(6):
        v = _rand_verification(g=8, T=T, seed=seed)
        v.target_logits[::3] *= 4  # some confident positions
        v.draft_tokens[seed % 3 :: 3] = v.target_logits[:-1].argmax(-1)[seed % 3 :: 3]  # some matches
        v.prev_hidden = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))
        rows.append(v)
    fields = ("draft_tokens", "target_logits", "target_hidden", "draft_logits", "draft_hidden")
    mask = torch.zeros(40, dtype=torch.bool)
    mask[::5] = True
    rules = {
        "judge": build_policy("judge", 0.5, head=head),
        "judge guarded": build_policy("judge", 0.5, head=head, options={"judge_strict_top1": 0.6}),
        "kl": build_policy("kl", 2.0),
        "likelihood": build_policy("likelihood", 1.0),
        "typical": build_policy("typical", 0.3),
        "topk": build_policy("topk", 3),
        "strict tokens": StrictTokens(build_policy("kl", 2.0), mask, "digits"),
    }
    seen = []

    class Seen(KLRule):
        def accept(self, v):
            seen.append(tuple(v.draft_tokens.shape))
            return super().accept(v)

    gen = torch.Generator().manual_seed(1)
    for name, rule in rules.items():
        v = Verification(*(torch.stack([getattr(r, f) for r in rows]) for f in fields), T)
        v.prev_hidden = torch.stack([r.prev_hidden for r in rows])
        std = standard_accept(v, gen)  # caches what the batch computes (argmax; log-probs when sampling)
        whole = torch.stack([rule.accept(v.row(i)) for i in range(len(rows))])
        got = apply_rule(rule, v, std)
        assert 0 < int((~std).sum()) < std.numel() and torch.equal(got, whole & ~std), name
        assert (whole & ~std).any() and (~whole & ~std).any(), name  # it accepted and refused some
        at = (~std).flatten().nonzero()[:, 0]
        spec = rules["judge"].feature_spec
        torch.testing.assert_close(verify_features(v.take(at), spec), verify_features(v, spec).flatten(0, 1)[at])
    seen.clear()
    assert torch.equal(apply_rule(Seen(2.0), v, std), Seen(2.0).accept(v) & ~std)
    assert sum(n for (n,) in seen[:-1]) == int((~std).sum()) and max(seen[:-1]) <= (RULE_CHUNK,)
    assert apply_rule(Seen(2.0), v, torch.ones_like(std)) is None  # nothing rejected: nothing asked
    Seen.positionwise = False
    seen.clear()
    assert torch.equal(apply_rule(Seen(2.0), v, std), Seen(2.0).accept(v))
    assert seen[:-1] == [(8,)] * len(rows)  # whole rows


@pytest.mark.parametrize("T", [0.0, 0.7])
def test_judge_guard_is_the_head_and_the_kl_rules_top1_test(T):
    """judge_strict_top1: the judge's answer, and strict where the target's top-1 probability exceeds it."""
    head = JudgeHead(JudgeConfig(feature_dim=8, target_model={}, features={"layers": [-1], "include_draft": False}))
    torch.manual_seed(0)
    with torch.no_grad():
        head.net.weight.normal_(0, 0.5)
    seen = set()
    for seed in range(6):
        v = _rand_verification(g=8, T=T, seed=seed)
        v.target_logits[::3] *= 4  # some confident positions
        s = T if T > 0 else 1.0
        top1 = [max(torch.softmax(v.target_logits[j].double() / s, -1).tolist()) for j in range(8)]
        for t in (0.3, 0.6, 1.0):
            plain = _acc("judge", t, v, head=head)
            for g in (0.5, 0.9):
                guarded = _acc("judge", t, v, head=head, options={"judge_strict_top1": g})
                assert guarded == [a and p <= g for a, p in zip(plain, top1)], (seed, t, g)
                seen |= {(a, b) for a, b in zip(plain, guarded)}
        assert _acc("judge", 0.0, v, head=head, options={"judge_strict_top1": 0.5}) == [False] * 8
    assert seen == {(True, True), (True, False), (False, False)}  # the guard took some acceptances away
    with pytest.raises(ValueError, match=r"policy_options.judge_strict_top1 must be null \(off\) or in \(0, 1\]"):
        build_policy("judge", 0.5, head=head, options={"judge_strict_top1": 0})
    with pytest.raises(ValueError, match=r"^eval.methods.j.options.judge_strict_top1 must be a number"):
        build_policy("judge", 0.5, head=head, options={"judge_strict_top1": "x"}, options_key="eval.methods.j.options")


def test_strict_tokens_take_away_only_the_rules_acceptances_in_the_class():
    """strict_tokens: any rule's answer, and no extra acceptance where the draft token or the target's choice
    is in the class (here a made-up mask over the 40-token vocabulary)."""
    mask = torch.zeros(40, dtype=torch.bool)
    mask[::3] = True
    head = JudgeHead(JudgeConfig(feature_dim=8, target_model={}, features={"layers": [-1], "include_draft": False}))
    took = 0
    for seed in range(6):
        v = _rand_verification(g=8, seed=seed)
        hit = (mask[v.draft_tokens] | mask[v.target_argmax[:-1]]).tolist()
        for name, t, kw in [
            ("kl", 4.0, {}),
            ("likelihood", 3.0, {}),
            ("typical", 0.05, {}),
            ("judge", 0.9, {"head": head}),
        ]:
            plain = _acc(name, t, v, **kw)
            strict = _acc(name, t, v, options={"strict_tokens": "digits"}, strict_masks={"digits": mask}, **kw)
            assert strict == [a and not h for a, h in zip(plain, hit)], (seed, name)
            took += sum(plain) - sum(strict)
    assert took > 0
    rule = build_policy("kl", 1.0, options={"strict_tokens": "digits"}, strict_masks={"digits": mask})
    assert rule.needs_draft_logits and rule.name == "kl" and rule.threshold == 1.0
    with pytest.raises(ValueError, match=r"policy_options.strict_tokens=digits needs the tokenizer's digits mask"):
        build_policy("kl", 1.0, options={"strict_tokens": "digits"})
    with pytest.raises(
        ValueError, match=r"eval.policy_options.strict_tokens must be null \(off\) or one of \['digits'\]"
    ):
        build_policy("kl", 1.0, options={"strict_tokens": "numbers"}, options_key="eval.policy_options")
    with pytest.raises(ValueError, match="strict_tokens must be null or one of"):
        strict_token_mask("numbers", None, 10)


def test_strictest_equals_lossless_loosest_accepts_all(pair):
    strict = [
        build_policy("lossless"),
        JudgeRule(0.0, _head(pair)),
        build_policy("topk", 1),
        build_policy("typical", float("inf")),
        build_policy("likelihood", 0.0),
        build_policy("kl", 0.0),
    ]
    loose = [
        JudgeRule(1.0, _head(pair, bias=20.0)),
        build_policy("topk", pair.vocab_size),
        build_policy("typical", 0.0),
        build_policy("likelihood", float("inf")),
        build_policy("kl", float("inf"), options={"kl_strict_top1": 1.0}),
    ]
    assert {type(p).__name__ for p in strict + loose} >= {"JudgeRule", "TopK", "Typical", "LikelihoodGap", "KLRule"}
    for q in PROMPTS:
        ids = format_prompt(pair.tokenizer, q)
        ref, ref_st = _run(pair, ids)
        for pol in strict:
            out, st = _run(pair, ids, pol)
            assert out == ref and st.accepted == ref_st.accepted, pol
        for pol in loose:
            _, st = _run(pair, ids, pol)
            assert st.accepted == st.proposed and st.accepted_by_rule > 0, pol


def test_lossy_rules_accept_more_as_they_loosen(pair):
    ids = format_prompt(pair.tokenizer, PROMPTS[1])
    for name, ths in (
        ("topk", [1, 3, 20]),
        ("likelihood", [0.0, 1.0, 4.0]),
        ("kl", [0.0, 0.5, 5.0]),
        ("typical", [float("inf"), 0.3, 0.01]),
    ):
        # more accepted per proposal, or the same when nothing was left to accept
        rates = [(lambda st: st.accepted / st.proposed)(_run(pair, ids, build_policy(name, t))[1]) for t in ths]
        assert rates[0] <= rates[1] <= rates[2] and rates[2] > rates[0], (name, rates)


def test_judge_threshold_zero_equals_lossless_also_when_sampling(pair):
    ids = format_prompt(pair.tokenizer, PROMPTS[2])
    head = _head(pair)
    for T in (0.0, 0.9):
        a = _run(
            pair,
            ids,
            None,
            temperature=T,
            generator=torch.Generator(next(pair.target.parameters()).device).manual_seed(3),
        )
        b = _run(
            pair,
            ids,
            JudgeRule(0.0, head),
            temperature=T,
            generator=torch.Generator(next(pair.target.parameters()).device).manual_seed(3),
        )
        assert a[0] == b[0] and a[1].accepted == b[1].accepted


def test_judge_reads_the_verify_pass_hidden_states(pair):
    """The judge's features for d_j are the target's (and draft's) hidden states of the very pass that
    verified it, equal to a no-cache recompute of the same sequence (data_gen's definition)."""
    seen: list[tuple] = []

    class Spy(JudgeRule):
        positionwise = False  # whole proposals, to compare each position with its definition

        def accept(self, v):
            seen.append((v.draft_tokens.clone(), v.target_hidden.clone(), v.draft_hidden.clone()))
            return super().accept(v)

    head = _head(pair, include_draft=True)
    ids = format_prompt(pair.tokenizer, PROMPTS[0])
    out, st = _run(pair, ids, Spy(0.5, head), n=12)
    assert seen and st.accepted_by_rule >= 0
    # replay: committed tokens before each round are known from the outputs of earlier rounds
    dev = next(pair.target.parameters()).device
    committed = list(ids)
    d_tok, t_hid, d_hid = seen[0]
    full = torch.tensor([committed + d_tok.tolist()], device=dev)
    t_ref = forward_with_hidden(pair.target, full, FeatureSpec(), use_cache=False).hidden[0, len(ids) :]
    d_ref = forward_with_hidden(pair.draft, full, FeatureSpec(), use_cache=False).hidden[0, len(ids) - 1 : -1]
    torch.testing.assert_close(t_hid, t_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d_hid, d_ref, rtol=1e-4, atol=1e-4)
    feats = judge_features(t_hid, head_spec := FeatureSpec(include_draft=True), d_hid)
    assert feats.shape[-1] == head.config.feature_dim and head_spec.include_draft


def test_judge_threshold_moves_acceptance(pair):
    ids = format_prompt(pair.tokenizer, PROMPTS[1])
    head = _head(pair)
    acc = [_run(pair, ids, JudgeRule(t, head))[1].accepted for t in (0.0, 0.3, 0.7, 1.0)]
    assert acc == sorted(acc) and acc[0] < acc[-1]


def test_registry_and_errors(pair, tmp_path):
    assert set(POLICIES) == {"lossless", "judge", "autojudge", "topk", "typical", "likelihood", "kl"}
    assert isinstance(build_policy("lossless"), Policy)
    with pytest.raises(ValueError, match=r"judge threshold must be in \[0, 1\]"):
        JudgeRule(1.5, _head(pair))
    with pytest.raises(ValueError, match=r"^autojudge: judge threshold must be in \[0, 1\]"):
        build_policy("autojudge", -0.1, head=_head(pair))
    with pytest.raises(ValueError, match="needs a judge head"):
        build_policy("judge", 0.5)
    with pytest.raises(ValueError, match="unknown policy 'medusa'"):
        build_policy("medusa", 1.0)
    with pytest.raises(ValueError, match="^topk: k must be an integer"):
        build_policy("topk", 2.5)
    with pytest.raises(ValueError, match="^likelihood: delta must be >= 0"):
        build_policy("likelihood", -1)
    with pytest.raises(ValueError, match="unknown policy_options"):
        build_policy("kl", 1.0, options={"strict": 0.9})
    # the caller names its own keys in the messages (the eval stage: eval.methods.<name>, eval.policy_options)
    with pytest.raises(ValueError, match=r"^eval.methods.autojudge: judge threshold must be in \[0, 1\]"):
        build_policy("autojudge", -0.1, head=_head(pair), key="eval.methods.autojudge")
    with pytest.raises(ValueError, match="^eval.methods.kl_loose: delta must be >= 0"):
        build_policy("kl", -1, key="eval.methods.kl_loose")
    with pytest.raises(ValueError, match="unknown eval.policy_options"):
        build_policy("kl", 1.0, options={"strict": 0.9}, options_key="eval.policy_options")
    with pytest.raises(ValueError, match="eval.policy_options.typical_alpha must be a number"):
        build_policy("typical", 0.1, options={"typical_alpha": "x"}, options_key="eval.policy_options")
    # heads that do not fit the loaded target
    info = pair.target_info.as_dict()
    H, Hd = pair.target_info.hidden_size, pair.draft_info.hidden_size
    other = JudgeHead(
        JudgeConfig(feature_dim=H, target_model={**info, "name": "other", "fingerprint": "sha256:" + "0" * 64})
    )
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"eval.judge_dir .*trained for target 'other'"):
        load_head(tmp_path / "other", info, H, Hd)
    wide = JudgeHead(JudgeConfig(feature_dim=2 * H, target_model=info))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=f"expects {2 * H} features, the target gives {H}"):
        load_head(tmp_path / "wide", info, H, Hd)
    with pytest.raises(FileNotFoundError, match="eval.autojudge_dir"):
        load_head(tmp_path / "missing", info, H, Hd, key="eval.autojudge_dir")
    ok = _head(pair, include_draft=True)
    ok.cpu().save_pretrained(tmp_path / "ok")
    assert load_head(tmp_path / "ok", info, H, Hd).config.feature_dim == H + Hd
