"""A tiny random model pair with a real BPE tokenizer, built locally with no downloads.

Used by the tests and by ``experiment=tiny``. The target is a small random Qwen2 (or Llama) model;
the draft is the same architecture with the target's weights plus Gaussian noise of relative size
``draft_noise``, so the pair agrees on most but not all next tokens, like a real draft/target pair.
``draft_noise=0`` makes the draft identical to the target.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from selfjudge.offline import build_folder_atomically

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A Qwen-style chat template (system/user/assistant turns between <|im_start|> and <|im_end|>).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a of to and in is was for on with as by at from that this it he she they we you "
    "has have had are were be been total number each per day week year more less than how many much "
    "apples eggs dollars books cars students miles hours minutes price cost sells buys gives gets "
    "answer step first then so therefore if what which janet john mary tom bakes eats spends saves "
    "def return for while print list sum range len int str import class self value result"
).split()


@dataclass(frozen=True)
class TinyPairSpec:
    seed: int = 0
    arch: str = "qwen2"  # qwen2 | llama
    vocab_size: int = 512  # BPE merges are trained up to this size
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_positions: int = 2048
    init_std: float = 0.1  # weight init std
    draft_noise: float = 0.05  # relative std of the noise added to the draft's weights

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _corpus(seed: int, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(5, 20)
        words = [rng.choice(_WORDS) if rng.random() < 0.8 else str(rng.randint(0, 999)) for _ in range(k)]
        sep = rng.choice([" ", " ", ", ", " = ", " + ", " * "])
        lines.append(sep.join(words) + rng.choice([".", "?", "\n", ":"]))
    return lines


def build_tokenizer(spec: TinyPairSpec):
    """Train a byte-level BPE tokenizer on a synthetic corpus; returns a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _config(spec: TinyPairSpec, vocab_size: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_std,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    if spec.arch == "qwen2":
        return Qwen2Config(**common)
    if spec.arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"tiny pair arch must be 'qwen2' or 'llama', got '{spec.arch}' (model.tiny.arch)")


def build_tiny_pair(root: str | Path, spec: TinyPairSpec = TinyPairSpec()) -> tuple[Path, Path]:
    """Build (once) and return the folders ``root/<key>/target`` and ``root/<key>/draft``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(root) / f"tiny-{spec.arch}-{spec.key()}"

    def build(tmp: Path) -> None:
        tok = build_tokenizer(spec)
        cfg = _config(spec, len(tok), tok.eos_token_id, tok.pad_token_id)
        torch.manual_seed(spec.seed)
        target = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        draft = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        draft.load_state_dict(target.state_dict())
        if spec.draft_noise > 0:
            g = torch.Generator().manual_seed(spec.seed + 1)
            with torch.no_grad():
                for p in draft.parameters():
                    scale = p.detach().float().std() if p.numel() > 1 else p.detach().abs().mean()
                    noise = torch.randn(p.shape, generator=g) * (spec.draft_noise * float(scale) + 1e-8)
                    p.add_(noise.to(p.dtype))
        gen = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False)
        for name, model in (("target", target), ("draft", draft)):
            model.generation_config = gen
            model.save_pretrained(tmp / name)
            tok.save_pretrained(tmp / name)
        (tmp / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))

    need = tuple(f"{n}/{f}" for n in ("target", "draft") for f in ("config.json", "model.safetensors"))
    build_folder_atomically(folder, build, need)
    return folder / "target", folder / "draft"
