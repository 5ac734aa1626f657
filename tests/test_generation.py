"""Batched greedy responses equal unbatched ``model.generate(do_sample=False)`` in fp32."""

from __future__ import annotations

import pytest
import torch

from selfjudge.generation import fixed_batches, greedy_batch
from selfjudge.models import format_prompt

PROMPTS = [
    "hi",
    "how many apples does janet have if she buys 3 bags of 4?",
    "def sum list of int",
    "the price of 3 books is 12 dollars, what is the price of one book in cents",
    "what is 7 * 8",
]


def _reference(pair, ids: list[int], n: int, eos: list[int]) -> list[int]:
    out = pair.target.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pair.tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    for k, t in enumerate(out):
        if t in eos:
            return out[: k + 1]
    return out


@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair"])
def test_batched_equals_unbatched_generate(pair_name, request):
    pair = request.getfixturevalue(pair_name)
    prompts = [format_prompt(pair.tokenizer, q) for q in PROMPTS]
    assert len({len(p) for p in prompts}) > 2  # left padding really happens
    got = {}
    for idx in fixed_batches([len(p) for p in prompts], 3):
        outs = greedy_batch(
            pair.target, [prompts[i] for i in idx], 30, pair.eos_ids, pair.tokenizer.pad_token_id, pair.vocab_size
        )
        got.update(zip(idx, outs))
    assert sorted(got) == list(range(len(PROMPTS)))
    for i, p in enumerate(prompts):
        assert got[i] == _reference(pair, p, 30, pair.eos_ids), f"prompt {i}"


def test_rows_stop_at_their_own_eos(tiny_pair):
    """Declare the 6th token of row 0 an EOS: row 0 stops there, the others run on, all as unbatched."""
    prompts = [format_prompt(tiny_pair.tokenizer, q) for q in PROMPTS[:3]]
    pad = tiny_pair.tokenizer.pad_token_id
    free = greedy_batch(tiny_pair.target, prompts, 20, [], pad, tiny_pair.vocab_size)
    assert all(len(r) == 20 for r in free)  # no EOS: max_new_tokens bounds every row
    eos = [free[0][5]]
    got = greedy_batch(tiny_pair.target, prompts, 20, eos, pad, tiny_pair.vocab_size)
    assert got[0] == free[0][: free[0].index(eos[0]) + 1]
    for p, r in zip(prompts, got):
        assert r == _reference(tiny_pair, p, 20, eos)
        assert eos[0] not in r[:-1]


def test_fixed_batches_are_stable():
    assert fixed_batches([5, 3, 5, 1], 2) == [[3, 1], [0, 2]]
    with pytest.raises(ValueError, match="data_gen.batch_size must be >= 1"):
        fixed_batches([1], 0, name="data_gen.batch_size")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fixed_batches([1], 0)
