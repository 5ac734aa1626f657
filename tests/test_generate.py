"""Using a judge outside the eval: ``target.generate(custom_generate=judge_generate)``, ``generate_text`` and
the ``selfjudge-generate`` command, on the tiny pair in fp32. Each returns the eval engine's tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TextStreamer

from selfjudge.batch_decoding import decode_batch
from selfjudge.decoding import decode
from selfjudge.generate import generate_text, judge_generate, load_generator
from selfjudge.io import write_json
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.models import format_prompt
from selfjudge.policies import build_policy

REPO = Path(__file__).resolve().parent.parent
QS = ["how many apples", "janet sells eggs at the market each day", "what is 12 * 7"]


def _head(pair, seed=0):
    head = JudgeHead(
        JudgeConfig(
            feature_dim=pair.target_info.hidden_size,
            target_model=pair.target_info.as_dict(),
            draft_model=pair.draft_info.as_dict(),
        )
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        head.net.weight.normal_(0, 0.3)
    return head.eval()


def _batch(pair, qs):
    """Left-padded input_ids and attention_mask, as a tokenizer with padding_side='left' gives them."""
    rows = [format_prompt(pair.tokenizer, q) for q in qs]
    width = max(map(len, rows))
    pad = pair.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return rows, ids, mask


def _new(out: torch.Tensor, width: int, pad: int, eos: list[int]) -> list[list[int]]:
    """New tokens per row of a generate() result, up to and including EOS (the rest is padding)."""
    rows = []
    for r in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut] if cut < len(r) or not r or r[-1] != pad else r[:cut])
    return rows


def _eos(pair) -> list[int]:
    e = pair.target.generation_config.eos_token_id
    return e if isinstance(e, list) else [e]


@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("batch", [1, 3])
def test_judge_in_generate_equals_the_eval_engine(tiny_pair, gamma, batch):
    pair, head = tiny_pair, _head(tiny_pair)
    prompts, ids, mask = _batch(pair, QS[:batch])
    out = pair.target.generate(
        input_ids=ids,
        attention_mask=mask,
        custom_generate=judge_generate,
        assistant_model=pair.draft,
        judge=head,
        judge_threshold=0.5,
        gamma=gamma,
        max_new_tokens=30,
        do_sample=False,
    )
    kw = dict(
        gamma=gamma,
        max_new_tokens=30,
        eos_ids=_eos(pair),
        vocab=pair.vocab_size,
        policy=build_policy("judge", 0.5, head=head),
    )
    ref = (
        [decode(pair.target, pair.draft, prompts[0], **kw)]
        if batch == 1
        else decode_batch(pair.target, pair.draft, prompts, pad_id=pair.tokenizer.pad_token_id, **kw)
    )
    assert sum(st.accepted_by_rule for _, st in ref) > 0  # the judge changed decisions
    assert torch.equal(out[:, : ids.shape[1]], ids)
    width = max(len(t) for t, _ in ref)
    assert out.shape == (batch, ids.shape[1] + width)
    for row, (toks, _) in zip(out[:, ids.shape[1] :].tolist(), ref):
        assert row == toks + [pair.tokenizer.pad_token_id] * (width - len(toks))


@pytest.mark.parametrize("batch", [1, 3])
def test_lossless_policy_equals_plain_greedy_generate(tiny_pair, batch):
    pair = tiny_pair
    _, ids, mask = _batch(pair, QS[:batch])
    plain = pair.target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=25, do_sample=False)
    ours = pair.target.generate(
        input_ids=ids,
        attention_mask=mask,
        custom_generate=judge_generate,
        assistant_model=pair.draft,
        policy="lossless",
        gamma=4,
        max_new_tokens=25,
        do_sample=False,
    )
    assert torch.equal(ours, plain)


def test_other_policies_static_cache_and_no_draft(tiny_pair):
    pair = tiny_pair
    prompts, ids, mask = _batch(pair, QS[1:2])
    kw = dict(max_new_tokens=20, eos_ids=_eos(pair), vocab=pair.vocab_size)
    for name, thr in (("kl", 0.5), ("topk", 3), ("likelihood", 1.5), ("typical", 0.3)):
        out = pair.target.generate(
            input_ids=ids,
            custom_generate=judge_generate,
            assistant_model=pair.draft,
            policy=name,
            threshold=thr,
            gamma=3,
            max_new_tokens=20,
            do_sample=False,
        )
        ref, _ = decode(pair.target, pair.draft, prompts[0], gamma=3, policy=build_policy(name, thr), **kw)
        assert out[0, ids.shape[1] :].tolist() == ref, name
    judge = _head(pair)
    static = pair.target.generate(
        input_ids=ids,
        custom_generate=judge_generate,
        assistant_model=pair.draft,
        judge=judge,
        judge_threshold=0.5,
        static_cache=True,
        max_new_tokens=20,
    )
    ref, _ = decode(pair.target, pair.draft, prompts[0], gamma=4, policy=build_policy("judge", 0.5, head=judge), **kw)
    assert static[0, ids.shape[1] :].tolist() == ref
    alone = pair.target.generate(input_ids=ids, custom_generate=judge_generate, max_new_tokens=20)
    assert torch.equal(alone, pair.target.generate(input_ids=ids, max_new_tokens=20, do_sample=False))


def test_sampling_follows_the_engine_with_the_same_generator(tiny_pair):
    pair, head = tiny_pair, _head(tiny_pair)
    prompts, ids, _ = _batch(pair, QS[:1])
    outs = [
        pair.target.generate(
            input_ids=ids,
            custom_generate=judge_generate,
            assistant_model=pair.draft,
            judge=head,
            judge_threshold=0.5,
            do_sample=True,
            temperature=0.8,
            top_k=None,
            top_p=None,
            max_new_tokens=20,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (1, 1, 2)
    ]
    ref, _ = decode(
        pair.target,
        pair.draft,
        prompts[0],
        gamma=4,
        max_new_tokens=20,
        eos_ids=_eos(pair),
        vocab=pair.vocab_size,
        policy=build_policy("judge", 0.5, head=head),
        temperature=0.8,
        generator=torch.Generator().manual_seed(1),
    )
    assert outs[0][0, ids.shape[1] :].tolist() == ref and torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


class _Capture(TextStreamer):
    def __init__(self, tok):
        super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
        self.text, self.ended = "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        self.ended = self.ended or stream_end


def test_streamer_receives_the_same_text(tiny_pair):
    pair, head = tiny_pair, _head(tiny_pair)
    _, ids, _ = _batch(pair, QS[:1])
    s = _Capture(pair.tokenizer)
    out = pair.target.generate(
        input_ids=ids,
        custom_generate=judge_generate,
        assistant_model=pair.draft,
        judge=head,
        judge_threshold=0.5,
        streamer=s,
        max_new_tokens=30,
    )
    assert s.ended and s.text == pair.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) != ""
    pieces = []
    text = generate_text(
        QS[0],
        target=pair.target,
        draft=pair.draft,
        tokenizer=pair.tokenizer,
        judge=head,
        threshold=0.5,
        max_new_tokens=30,
        stream=pieces.append,
    )
    assert "".join(pieces) == text == s.text and len(pieces) > 1  # one piece per round


def test_bad_arguments_are_named(tiny_pair):
    pair = tiny_pair
    _, ids, _ = _batch(pair, QS[:1])
    with pytest.raises(ValueError, match="needs a judge head"):
        pair.target.generate(
            input_ids=ids, custom_generate=judge_generate, assistant_model=pair.draft, policy="judge", max_new_tokens=4
        )
    with pytest.raises(ValueError, match="needs a threshold"):
        pair.target.generate(
            input_ids=ids, custom_generate=judge_generate, assistant_model=pair.draft, policy="kl", max_new_tokens=4
        )
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        pair.target.generate(input_ids=ids, custom_generate=judge_generate, policy="nope", max_new_tokens=4)
    wide = JudgeHead(JudgeConfig(feature_dim=pair.target_info.hidden_size + 1))
    with pytest.raises(ValueError, match="expects 65 features"):
        pair.target.generate(
            input_ids=ids, custom_generate=judge_generate, assistant_model=pair.draft, judge=wide, max_new_tokens=4
        )


@pytest.fixture
def run_folder(tmp_path, tiny_pair, tiny_model_cfg):
    """A run folder as the pipeline leaves it: the data manifest's config names the pair; the head sits in
    judge/head."""
    write_json(tmp_path / "data" / "manifest.json", {"complete": True, "config": {"model": tiny_model_cfg}})
    _head(tiny_pair).save_pretrained(tmp_path / "judge" / "head")
    return tmp_path


def test_generate_text_from_a_run_folder(run_folder, tiny_pair):
    gen = load_generator(run_dir=run_folder, threshold=0.5)
    assert gen.rule.name == "judge"
    text, st = gen(QS[0], max_new_tokens=24)
    ref, _ = decode(
        tiny_pair.target,
        tiny_pair.draft,
        format_prompt(tiny_pair.tokenizer, QS[0]),
        gamma=4,
        max_new_tokens=24,
        eos_ids=tiny_pair.eos_ids,
        vocab=tiny_pair.vocab_size,
        policy=build_policy("judge", 0.5, head=_head(tiny_pair)),
    )
    assert text == tiny_pair.tokenizer.decode(ref, skip_special_tokens=True) and st.new_tokens == len(ref)
    assert generate_text(QS[0], run_dir=run_folder, threshold=0.5, max_new_tokens=24) == text
    other = dict(tiny_pair.target_info.as_dict(), fingerprint="sha256:" + "0" * 64)
    JudgeHead(JudgeConfig(feature_dim=64, target_model=other)).save_pretrained(run_folder / "bad")
    with pytest.raises(ValueError, match="trained for target"):
        load_generator(run_dir=run_folder, judge=run_folder / "bad")


def test_cli_streams_on_the_tiny_pair(run_folder, tiny_pair):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "selfjudge.cli.generate",
        f"run_dir={run_folder}",
        f"prompt={QS[0]}",
        "max_new_tokens=24",
        "threshold=0.5",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    want = generate_text(QS[0], run_dir=run_folder, threshold=0.5, max_new_tokens=24)
    assert res.stdout == want + "\n"
    assert "judge@0.5" in res.stderr and "tokens" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "selfjudge.cli.generate", f"run_dir={run_folder}", "prompt=x", "gama=3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 2 and "unknown key 'gama'" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "selfjudge.cli.generate", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0 and "run_dir=" in res.stdout and "policy=" in res.stdout
