"""Judge feature options: each part equals its definition computed by hand from plain forward passes of
the tiny pair (fp32), in data_gen's scorer and in the verify pass alike; layouts are checked by name."""

from __future__ import annotations

import math

import pytest
import torch

from selfjudge.decoding import decode
from selfjudge.features import SCALARS, FeatureSpec
from selfjudge.generation import greedy_batch, greedy_batch_traced
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.models import format_prompt
from selfjudge.policies import JudgeRule, load_head, verify_features
from selfjudge.scoring import score_response, score_response_naive

FULL = FeatureSpec(layers=(1, -1), include_draft=True, state_offsets=(-1, 0), scalars=SCALARS)


def _hidden(model, ids: list[int], layers) -> torch.Tensor:
    """[L, F]: hidden_states of the chosen layers at every position, from one plain forward."""
    hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([hs[i][0] for i in layers], -1)


def _by_hand(pair, seq: list[int], at: int, token: int, spec: FeatureSpec, layers) -> torch.Tensor:
    """The features of ``token`` read at position ``at`` of ``seq`` (seq[at] == token), each part from
    its definition: states at ``at`` and ``at-1``, the draft state at ``at-1``, the rule quantities of
    p = softmax(target logits at at-1) and q = the draft's, in float64 arithmetic."""
    assert seq[at] == token
    V = pair.vocab_size
    t_h = _hidden(pair.target, seq, layers)
    d_out = pair.draft(torch.tensor([seq]), output_hidden_states=True)
    lp = torch.log_softmax(pair.target(torch.tensor([seq])).logits[0, at - 1, :V].double(), -1)
    lq = torch.log_softmax(d_out.logits[0, at - 1, :V].double(), -1)
    p, q = lp.exp(), lq.exp()
    rank = sum(1 for v in range(V) if p[v] > p[token])
    vals = {
        "target_logp": math.log(p[token]),
        "target_top1_logp": math.log(p.max()),
        "target_gap": math.log(p.max()) - math.log(p[token]),
        "target_entropy": -sum(float(p[v] * lp[v]) for v in range(V)),
        "target_log_rank": math.log(1 + rank),
        "draft_logp": math.log(q[token]),
        "kl": sum(float(q[v] * (lq[v] - lp[v])) for v in range(V)),
    }
    parts = [t_h[at + off] for off in spec.state_offsets]
    parts += [d_out.hidden_states[-1][0, at - 1]] if spec.include_draft else []
    parts += [torch.tensor([vals[n] for n in spec.scalars])]
    return torch.cat([x.float() for x in parts])


def _responses(pair, n=2, T=24):
    prompts = [format_prompt(pair.tokenizer, p) for p in ("how many apples", "janet sells eggs")][:n]
    return prompts, greedy_batch(pair.target, prompts, T, pair.eos_ids, pair.tokenizer.pad_token_id, pair.vocab_size)


@torch.no_grad()
@pytest.mark.parametrize("scorer", ["fast", "traced", "naive"])
def test_data_gen_features_equal_their_definitions(tiny_pair, scorer):
    pair = tiny_pair
    prompts, resps = _responses(pair)
    traces = (
        greedy_batch_traced(
            pair.target, prompts, 24, pair.eos_ids, pair.tokenizer.pad_token_id, pair.vocab_size, spec=FULL
        )[1]
        if scorer == "traced"
        else [None, None]
    )
    checked = 0
    for ids, resp, trace in zip(prompts, resps, traces):
        fn = score_response_naive if scorer == "naive" else score_response
        kw = {"trace": trace} if trace is not None else {}
        sc = fn(pair.target, pair.draft, ids, resp, pair.vocab_size, window=4, spec=FULL, **kw)
        cols = FULL.columns(pair.target_info.hidden_size, pair.draft_info.hidden_size)
        assert sc.sub_features.shape[1] == FULL.dim(64, 64) == 4 * 64 + 64 + len(SCALARS)
        for j in range(min(3, len(sc.positions))):
            i, d, y = int(sc.positions[j]), int(sc.draft_tokens[j]), int(sc.target_tokens[j])
            at = len(ids) + i
            sub = _by_hand(pair, ids + resp[:i] + [d] + resp[i + 1 :], at, d, FULL, FULL.layers)
            orig = _by_hand(pair, ids + resp, at, y, FULL, FULL.layers)
            torch.testing.assert_close(sc.sub_features[j], sub, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(sc.orig_features[j], orig, rtol=1e-4, atol=1e-4)
            assert float(sc.orig_features[j, cols["target_gap"]]) == pytest.approx(0.0, abs=1e-5)  # y_i is the argmax
            checked += 1
    assert checked >= 2


@torch.no_grad()
@pytest.mark.parametrize("T", [0.0, 0.8])
def test_verify_pass_features_equal_their_definitions(tiny_pair, T):
    """The judge policy's features of d_j come from the verify pass (no extra forward) and equal the
    by-hand definition over committed ⊕ d_1..d_γ; with sampling they still read untempered p and q."""
    pair = tiny_pair
    H, Hd = pair.target_info.hidden_size, pair.draft_info.hidden_size
    head = JudgeHead(
        JudgeConfig(feature_dim=FULL.dim(H, Hd), features=FULL.as_dict(), target_model=pair.target_info.as_dict())
    ).eval()
    seen = []

    class Spy(JudgeRule):
        positionwise = False  # whole proposals, to compare each position with its definition

        def accept(self, v):
            seen.append((v.draft_tokens.clone(), verify_features(v, self.feature_spec)))
            return super().accept(v)

    rule = Spy(0.5, head)
    assert rule.needs_draft_logits and rule.needs_draft_hidden
    ids = format_prompt(pair.tokenizer, "what is 12 * 7")
    gen = torch.Generator().manual_seed(0) if T > 0 else None
    decode(
        pair.target,
        pair.draft,
        ids,
        gamma=4,
        max_new_tokens=12,
        eos_ids=pair.eos_ids,
        vocab=pair.vocab_size,
        policy=rule,
        temperature=T,
        generator=gen,
    )
    toks, feats = seen[0]  # first round: committed = the prompt
    seq = ids + toks.tolist()
    for j in range(len(toks)):
        at = len(ids) + j
        torch.testing.assert_close(
            feats[j], _by_hand(pair, seq, at, int(toks[j]), FULL, FULL.layers), rtol=1e-4, atol=1e-4
        )


def test_spec_keys_layouts_and_errors():
    old = FeatureSpec.from_mapping({"layers": [-1], "include_draft": False})  # a head saved before the options
    assert old == FeatureSpec() and old.dim(64) == 64 and not old.needs_draft_logits
    cols = FULL.columns(64, 32)
    assert [k for k in cols] == ["state@-1", "state@0", "draft", *SCALARS]
    assert cols["state@0"] == slice(128, 256) and cols["kl"] == slice(294, 295) and FULL.dim(64, 32) == 295
    assert FeatureSpec.from_mapping(FULL.as_dict()) == FULL
    scal = FeatureSpec.from_mapping({"state_offsets": [], "scalars": ["target_gap"]})
    assert scal.dim(64) == 1 and not scal.needs_draft_logits
    with pytest.raises(ValueError, match="features.scalars must be distinct names"):
        FeatureSpec.from_mapping({"scalars": ["kl", "margin"]})
    with pytest.raises(ValueError, match="features.state_offsets"):
        FeatureSpec.from_mapping({"state_offsets": [1]})
    with pytest.raises(ValueError, match="features select nothing"):
        FeatureSpec.from_mapping({"state_offsets": []})
    with pytest.raises(KeyError, match="unknown feature key"):
        FeatureSpec.from_mapping({"scalar": ["kl"]})


def test_head_with_new_features_loads_and_other_layouts_are_refused(tiny_pair, tmp_path):
    pair = tiny_pair
    H, Hd, info = pair.target_info.hidden_size, pair.draft_info.hidden_size, pair.target_info.as_dict()
    JudgeHead(JudgeConfig(feature_dim=FULL.dim(H, Hd), features=FULL.as_dict(), target_model=info)).save_pretrained(
        tmp_path / "h"
    )
    head = load_head(tmp_path / "h", info, H, Hd)
    assert FeatureSpec.from_mapping(head.config.features) == FULL
    # a folder whose stored size does not fit its layout on this target is refused, naming the layout
    bad = FeatureSpec(scalars=("kl",))
    JudgeHead(JudgeConfig(feature_dim=FULL.dim(H, Hd), features=bad.as_dict(), target_model=info)).save_pretrained(
        tmp_path / "b"
    )
    with pytest.raises(ValueError, match="eval.judge_dir .*expects 327 features, the target gives 65"):
        load_head(tmp_path / "b", info, H, Hd)


def test_training_folders_must_share_the_feature_layout(tmp_path):
    """Old manifests (no new keys) and new ones of the same layout train together; two layouts of the
    same size (a different scalar) are refused, naming the key."""
    from selfjudge.judge_data import load_judge_data
    from selfjudge.shards import read_manifest, write_manifest
    from tests.judge_shards import DIM, make_shards

    old = make_shards(tmp_path / "old", n_prompts=8, seed=1, prompt_prefix="o")
    new = make_shards(tmp_path / "new", n_prompts=8, seed=2, prompt_prefix="n")
    man = read_manifest(new)
    write_manifest(new, {**man, "features": FeatureSpec().as_dict()})
    data = load_judge_data([str(old), str(new)], "selfjudge", True, 0.2, 0)
    assert data.feature_dim == DIM
    for name, scalar in (("a", "kl"), ("b", "target_gap")):
        d = make_shards(tmp_path / name, n_prompts=8, dim=DIM, seed=3, prompt_prefix=name)
        m = read_manifest(d)
        m["target_model"]["hidden_size"] = DIM - 1
        write_manifest(d, {**m, "features": FeatureSpec(scalars=(scalar,)).as_dict()})
    with pytest.raises(ValueError, match="different feature layouts"):
        load_judge_data([str(tmp_path / "a"), str(tmp_path / "b")], "selfjudge", True, 0.2, 0)


@torch.no_grad()
def test_batched_verify_features_equal_their_definitions(tiny_pair):
    """decode_batch hands the rule [1, γ] rows (CPU): the same features, by hand, for each row's first round."""
    from selfjudge.batch_decoding import decode_batch

    pair = tiny_pair
    H, Hd = pair.target_info.hidden_size, pair.draft_info.hidden_size
    head = JudgeHead(
        JudgeConfig(feature_dim=FULL.dim(H, Hd), features=FULL.as_dict(), target_model=pair.target_info.as_dict())
    ).eval()
    seen = []

    class Spy(JudgeRule):
        positionwise = False  # whole proposals, to compare each position with its definition

        def accept(self, v):
            seen.append((v.draft_tokens.clone(), verify_features(v, self.feature_spec)))
            return super().accept(v)

    prompts = [format_prompt(pair.tokenizer, p) for p in ("what is 12 * 7", "janet sells eggs")]
    decode_batch(
        pair.target,
        pair.draft,
        prompts,
        gamma=4,
        max_new_tokens=10,
        eos_ids=pair.eos_ids,
        vocab=pair.vocab_size,
        policy=Spy(0.5, head),
    )
    for row, ids in enumerate(prompts):  # the first call covers every row's first round
        toks, feats = seen[row]
        toks, feats = toks.reshape(-1), feats.reshape(len(toks.reshape(-1)), -1)
        seq = ids + toks.tolist()
        for j in range(len(toks)):
            torch.testing.assert_close(
                feats[j], _by_hand(pair, seq, len(ids) + j, int(toks[j]), FULL, FULL.layers), rtol=1e-4, atol=1e-4
            )


@torch.no_grad()
def test_verify_features_equal_their_definitions_in_every_round(tiny_pair):
    """Every round, not only the first: rows that accept all, none or every other proposal drift apart (the
    batch's padding, caches and positions with them), and each proposal's features still equal the definition
    over the row's committed tokens ⊕ its proposals (greedy; the rule's verdicts are its own, so each row's
    committed tokens are known without reading the decoder)."""
    from selfjudge.batch_decoding import decode_batch

    pair = tiny_pair
    H, Hd = pair.target_info.hidden_size, pair.draft_info.hidden_size
    head = JudgeHead(
        JudgeConfig(feature_dim=FULL.dim(H, Hd), features=FULL.as_dict(), target_model=pair.target_info.as_dict())
    ).eval()
    prompts = [format_prompt(pair.tokenizer, p) for p in ("what is 12 * 7", "janet sells eggs at the market", "hi")]
    T, gamma = 30, 4
    done = [0] * len(prompts)  # committed tokens per row, as the rule's verdicts decide them
    committed: list[list[int]] = [[] for _ in prompts]
    checks: list[tuple[int, list[int], list[int], torch.Tensor]] = []
    turn = []  # rows still decoding this round, in batch order

    class Spy(JudgeRule):
        positionwise = False  # whole proposals, to compare each position with its definition

        def accept(self, v):
            if not turn:
                turn.extend(r for r in range(len(prompts)) if done[r] < T)
            r = turn.pop(0)
            D = v.draft_tokens.tolist()
            mine = [True] * len(D) if r == 0 else [False] * len(D) if r == 1 else [j % 2 == 0 for j in range(len(D))]
            ok = [m or d == a for m, d, a in zip(mine, D, v.target_argmax[:-1].tolist())]
            kept = next((j for j, o in enumerate(ok) if not o), len(D))
            checks.append((r, list(committed[r]), D, verify_features(v, self.feature_spec)))
            kept = min(kept, T - done[r] - 1)  # the budget's allowance, as the decoder keeps it
            new = D[:kept] + [int(v.target_argmax[kept])]
            committed[r] += new
            done[r] += len(new)
            return torch.tensor(mine)

    out = decode_batch(
        pair.target,
        pair.draft,
        prompts,
        gamma=gamma,
        max_new_tokens=T,
        eos_ids=[],
        vocab=pair.vocab_size,
        policy=Spy(0.5, head),
    )
    assert [o[0] for o in out] == committed  # every row's tokens, as tracked
    rounds = {r: sum(1 for c in checks if c[0] == r) for r in range(len(prompts))}
    assert min(rounds.values()) >= 3 and len(set(rounds.values())) > 1  # several rounds, rows out of step
    for r, before, D, feats in checks:
        assert out[r][0][: len(before)] == before  # the tracked tokens are the decoder's
        seq = prompts[r] + before + D
        for j in range(len(D)):
            at = len(prompts[r]) + len(before) + j
            torch.testing.assert_close(feats[j], _by_hand(pair, seq, at, D[j], FULL, FULL.layers), rtol=1e-4, atol=1e-4)
