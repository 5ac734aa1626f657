"""Use a trained judge: speculative decoding with any acceptance policy behind ``transformers``' ``generate()``
and as plain text in, text out. Both run the eval engine (:func:`selfjudge.decoding.decode` at batch 1,
:func:`selfjudge.batch_decoding.decode_batch` above), so they return exactly the eval's tokens.

``transformers`` (5.x), a callable for ``custom_generate``::

    from selfjudge.generate import judge_generate
    out = target.generate(**tok(prompt, return_tensors="pt"), custom_generate=judge_generate,
                          assistant_model=draft, judge=head, judge_threshold=0.3, max_new_tokens=256,
                          do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))

``policy="kl", threshold=0.5`` (or lossless, typical, likelihood, topk) picks another rule; ``gamma`` is the
draft window; ``static_cache=True`` decodes on static KV caches with CUDA graphs (batch 1, the default on
CUDA). EOS ids, ``max_new_tokens``, ``do_sample`` and ``temperature`` come from the generation config.
transformers 5.24 hands a ``custom_generate`` callable neither ``assistant_model`` nor ``streamer``:
:func:`judge_generate` reads them from the ``generate()`` call that invoked it.

Text in, text out: :func:`generate_text` (``run_dir=`` loads the run's model pair and judge head); the
command line: ``selfjudge-generate run_dir=runs/quickstart prompt="..."`` (``selfjudge.generate_cli``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfjudge.batch_decoding import decode_batch
from selfjudge.decoding import DecodeStats, decode
from selfjudge.features import FeatureSpec
from selfjudge.judge import JudgeHead
from selfjudge.policies import POLICIES, Policy, build_policy, load_head

log = logging.getLogger(__name__)

# logits processors / stopping criteria that the engine's own rules already cover
_ENGINE_PROCESSORS = {"TemperatureLogitsWarper"}
_ENGINE_CRITERIA = {"MaxLengthCriteria", "EosTokenCriteria", "MaxTimeCriteria"}


def _from_generate_call(model: torch.nn.Module, name: str) -> Any:
    """An argument of the ``model.generate(...)`` call that invoked us (transformers passes a callable
    ``custom_generate`` neither ``assistant_model`` nor ``streamer``); None outside such a call."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        if frame.f_code.co_name == "generate" and frame.f_locals.get("self") is model:
            return frame.f_locals.get(name)
        frame = frame.f_back
    return None


def make_policy(
    *,
    judge: JudgeHead | str | Path | None = None,
    policy: str | None = None,
    threshold: float | None = None,
    options: Mapping[str, Any] | None = None,
) -> Policy:
    """The acceptance rule: ``policy`` by name (default ``judge`` when a head is given, else lossless);
    ``judge``: a JudgeHead, a head folder or a hub repo id; ``threshold``: the rule's threshold (judge:
    the P(important) cut, default the head's 0.5)."""
    name = policy or ("judge" if judge is not None else "lossless")
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}'; known: {sorted(POLICIES)}")
    head = judge
    if head is not None and not isinstance(head, JudgeHead):
        head = JudgeHead.from_pretrained(head)
    if POLICIES[name] is POLICIES["judge"]:
        if head is None:
            raise ValueError(f"policy '{name}' needs a judge head: pass judge=<JudgeHead, head folder or hub id>")
        threshold = 0.5 if threshold is None else threshold
    elif name != "lossless" and threshold is None:
        raise ValueError(f"policy '{name}' needs a threshold (threshold=...; see selfjudge.policies)")
    return build_policy(name, threshold, head=head, options=options)


def _check_head_fits(rule: Policy, target: torch.nn.Module, draft: torch.nn.Module | None) -> None:
    head = getattr(rule, "head", None)
    if head is None:
        return
    spec = FeatureSpec.from_mapping(head.config.features)
    want = spec.dim(target.config.hidden_size, draft.config.hidden_size if draft is not None else None)
    if head.config.feature_dim != want:
        raise ValueError(
            f"the judge head expects {head.config.feature_dim} features; this target gives {want} "
            f"(hidden size {target.config.hidden_size}, layers {spec.layers}): a head for another model"
        )
    dev = next(target.parameters()).device
    if next(head.parameters()).device != dev:
        head.to(dev)


def _vocab(target: torch.nn.Module, draft: torch.nn.Module | None) -> int:
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (target, draft) if m is not None]
    return min(sizes)


def _eos_ids(cfg) -> list[int]:
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        return []
    eos = eos.tolist() if torch.is_tensor(eos) else eos
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def run_engine(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompts: list[list[int]],
    *,
    rule: Policy,
    gamma: int,
    max_new_tokens: int,
    eos_ids: list[int],
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    static_cache: bool | None = None,
    pad_id: int = 0,
    on_tokens=None,
) -> list[tuple[list[int], DecodeStats]]:
    """Decode prompts with the eval engine: batch 1 through ``decode`` (streaming, static caches), more
    through ``decode_batch``. ``static_cache=None``: on at batch 1 on CUDA."""
    _check_head_fits(rule, target, draft)
    vocab = _vocab(target, draft)
    policy = None if rule.name == "lossless" else rule
    common = dict(
        gamma=gamma,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        vocab=vocab,
        policy=policy,
        temperature=temperature,
        generator=generator,
    )
    if len(prompts) == 1:
        if static_cache is None:
            static_cache = next(target.parameters()).device.type == "cuda"
        return [decode(target, draft, prompts[0], static_cache=static_cache, on_tokens=on_tokens, **common)]
    if static_cache:
        raise ValueError("static_cache=True decodes one prompt at a time; pass a batch of 1 (or static_cache=False)")
    if on_tokens is not None:
        raise ValueError("streaming needs a batch of one prompt")
    return decode_batch(target, draft, prompts, pad_id=pad_id, **common)


def judge_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    assistant_model: torch.nn.Module | None = None,
    judge: JudgeHead | str | Path | None = None,
    judge_threshold: float | None = None,
    policy: str | None = None,
    threshold: float | None = None,
    policy_options: Mapping[str, Any] | None = None,
    gamma: int = 4,
    static_cache: bool | None = None,
    generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> torch.LongTensor:
    """``custom_generate`` for ``model.generate()``: speculative decoding of ``model`` (the target) with
    ``assistant_model`` (the draft) under ``judge`` at ``judge_threshold`` (or ``policy``/``threshold``).

    Returns what ``generate()`` returns: ``[B, prompt + new]`` ids, rows that stop early padded with the
    pad id (a ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``). Batches are left-padded
    (``attention_mask``). Without a draft the target decodes alone through the same engine."""
    cfg = generation_config if generation_config is not None else model.generation_config
    if assistant_model is None:
        assistant_model = _from_generate_call(model, "assistant_model")
    if streamer is None:
        streamer = _from_generate_call(model, "streamer")
    if judge_threshold is not None and threshold is not None:
        raise ValueError("pass judge_threshold or threshold, not both")
    rule = make_policy(
        judge=judge,
        policy=policy,
        threshold=judge_threshold if judge_threshold is not None else threshold,
        options=policy_options,
    )
    ignored = sorted(
        {type(p).__name__ for p in (logits_processor or [])} - _ENGINE_PROCESSORS
        | {type(c).__name__ for c in (stopping_criteria or [])} - _ENGINE_CRITERIA
    )
    if ignored:
        log.warning(
            "judge_generate decodes with greedy or plain temperature sampling and stops at EOS or "
            "max_new_tokens; ignored: %s",
            ", ".join(ignored),
        )
    if getattr(cfg, "num_beams", 1) not in (None, 1) or getattr(cfg, "num_return_sequences", 1) not in (None, 1):
        raise ValueError("judge_generate decodes one sequence per prompt: set num_beams=1, num_return_sequences=1")
    mask = model_kwargs.get("attention_mask")
    rows = (
        input_ids.tolist()
        if mask is None
        else [[t for t, m in zip(r, mr) if m] for r, mr in zip(input_ids.tolist(), mask.tolist())]
    )
    prompt_len = input_ids.shape[1]
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length - prompt_len
    temperature = float(cfg.temperature if cfg.temperature is not None else 1.0) if cfg.do_sample else 0.0
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (_eos_ids(cfg) or [0])[0]
    on_tokens = None
    if streamer is not None:

        def on_tokens(toks: list[int]) -> None:
            if toks:
                streamer.put(torch.tensor(toks, dtype=torch.long))

    try:
        res = run_engine(
            model,
            assistant_model,
            rows,
            rule=rule,
            gamma=gamma,
            max_new_tokens=max_new,
            eos_ids=_eos_ids(cfg),
            temperature=temperature,
            generator=generator,
            static_cache=static_cache,
            pad_id=int(pad),
            on_tokens=on_tokens,
        )
    finally:
        if streamer is not None:
            streamer.end()
    width = max(len(t) for t, _ in res)
    new = torch.full((len(res), width), int(pad), dtype=torch.long)
    for i, (toks, _) in enumerate(res):
        new[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    seqs = torch.cat([input_ids.cpu(), new], 1).to(input_ids.device)
    if getattr(cfg, "return_dict_in_generate", False):
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=seqs)
    return seqs


# --------------------------------------------------------------------------- text in, text out
@dataclass
class Generator:
    """A loaded pair (+ tokenizer) and the rule to decode with; ``generate_text`` builds one per call,
    build it once with :func:`load_generator` to decode many prompts."""

    target: torch.nn.Module
    draft: torch.nn.Module | None
    tokenizer: Any
    rule: Policy
    eos_ids: list[int]

    def __call__(
        self,
        prompt: str | list[dict],
        *,
        max_new_tokens: int = 256,
        gamma: int = 4,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
        system: str | None = None,
        chat: bool = True,
        stream=None,
        static_cache: bool | None = None,
    ) -> tuple[str, DecodeStats]:
        """Decode one prompt; (text, stats). ``stream``: a callable given each round's new text (e.g.
        ``print(..., end="", flush=True)``) or a transformers streamer (``put``/``end``)."""
        from selfjudge.models import format_prompt

        ids = format_prompt(self.tokenizer, prompt, system=system, chat=chat)
        gen = None
        if do_sample:
            gen = torch.Generator(device=next(self.target.parameters()).device)
            gen.manual_seed(0 if seed is None else int(seed))
        on_tokens, finish = _text_sink(self.tokenizer, stream) if stream is not None else (None, None)
        ((toks, st),) = run_engine(
            self.target,
            self.draft,
            [ids],
            rule=self.rule,
            gamma=gamma,
            max_new_tokens=max_new_tokens,
            eos_ids=self.eos_ids,
            temperature=temperature if do_sample else 0.0,
            generator=gen,
            static_cache=static_cache,
            on_tokens=on_tokens,
        )
        if finish is not None:
            finish()
        return self.tokenizer.decode(toks, skip_special_tokens=True), st


def _text_sink(tokenizer, stream):
    """(per-round sink, finish) for a stream: a transformers streamer gets the ids (``put``, then ``end``),
    a plain callable the new text, decoded over the whole output so that multi-token characters come whole."""
    if hasattr(stream, "put"):
        return (lambda toks: stream.put(torch.tensor(toks, dtype=torch.long)) if toks else None), stream.end
    state = {"ids": [], "text": ""}

    def sink(toks: list[int], final: bool = False) -> None:
        state["ids"] += toks
        text = tokenizer.decode(state["ids"], skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # a character still being spelled out: wait for its bytes
            return
        if len(text) > len(state["text"]):
            stream(text[len(state["text"]) :])
        state["text"] = text

    return sink, lambda: sink([], final=True)


def model_config_of_run(run_dir: str | Path) -> dict:
    """The ``model`` config a run folder was made with (from its data manifest, else its eval summary)."""
    from selfjudge.io import read_json

    run_dir = Path(run_dir)
    for rel in ("data/manifest.json", "eval/summary.json"):
        p = run_dir / rel
        if p.is_file():
            model = (read_json(p).get("config") or {}).get("model")
            if model:
                return dict(model)
    raise FileNotFoundError(
        f"run_dir '{run_dir}' has no data/manifest.json or eval/summary.json with the model "
        f"config: pass the pair by name (model=qwen_coder_offline) or as models"
    )


def model_config_by_name(name: str) -> dict:
    """A ``conf/model/<name>.yaml`` preset as a plain dict (qwen_coder_offline, qwen_coder, tiny, ...)."""
    from importlib import resources

    from omegaconf import OmegaConf

    folder = resources.files("selfjudge.conf") / "model"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
        raise ValueError(f"model '{name}' is not a model preset; known: {known}")
    return OmegaConf.to_container(OmegaConf.load(str(path)), resolve=True)


def load_generator(
    *,
    run_dir: str | Path | None = None,
    model: str | Mapping[str, Any] | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    target: torch.nn.Module | None = None,
    draft: torch.nn.Module | None = None,
    tokenizer: Any = None,
    judge: JudgeHead | str | Path | None = None,
    policy: str | None = None,
    threshold: float | None = None,
    policy_options: Mapping[str, Any] | None = None,
) -> Generator:
    """Load a pair and a rule. The pair: loaded models (``target``, ``draft``, ``tokenizer``), else ``model``
    (a preset name or a ``model`` config mapping), else the one ``run_dir`` was made with; ``model_overrides``
    replace top-level keys of the config (dtype, device, cache_dir). The judge: ``judge`` (a head, a folder
    or a hub id), else ``run_dir/judge/head`` when the policy is judge (the default with a run folder).
    A head loaded with a configured pair is checked against its target (fingerprint, feature size)."""
    from selfjudge.models import eos_token_ids, pair_from_mapping

    name = policy or ("judge" if judge is not None or run_dir is not None else "lossless")
    wants_head = POLICIES.get(name) is POLICIES["judge"]
    head = judge if judge is not None else (Path(run_dir) / "judge" / "head" if wants_head and run_dir else None)
    if target is not None:
        if tokenizer is None:
            raise ValueError("pass tokenizer= with target= (prompts are tokenized with the pair's tokenizer)")
        eos = eos_token_ids(target, tokenizer)
    else:
        if model is None and run_dir is None:
            raise ValueError(
                "pass run_dir=<a run folder>, model=<a model preset such as qwen_coder_offline> "
                "or target=/draft=/tokenizer="
            )
        cfg = (
            model_config_by_name(model)
            if isinstance(model, str)
            else dict(model)
            if model is not None
            else model_config_of_run(run_dir)
        )
        cfg.update(model_overrides or {})
        pair = pair_from_mapping(cfg)
        target, draft, tokenizer, eos = pair.target, pair.draft, pair.tokenizer, pair.eos_ids
        if wants_head and head is not None and not isinstance(head, JudgeHead) and Path(head).is_dir():
            head = load_head(
                head,
                pair.target_info.as_dict(),
                pair.target_info.hidden_size,
                pair.draft_info.hidden_size,
                next(target.parameters()).device,
                key="judge",
            )
        if isinstance(head, JudgeHead):
            head.check_compatible(
                pair.target_info.as_dict(),
                FeatureSpec.from_mapping(head.config.features).dim(
                    pair.target_info.hidden_size, pair.draft_info.hidden_size
                ),
            )
    rule = make_policy(judge=head if wants_head else None, policy=name, threshold=threshold, options=policy_options)
    return Generator(target, draft, tokenizer, rule, eos)


_LOAD_KEYS = (
    "run_dir",
    "model",
    "model_overrides",
    "target",
    "draft",
    "tokenizer",
    "judge",
    "policy",
    "threshold",
    "policy_options",
)


def generate_text(prompt: str | list[dict], **kwargs: Any) -> str:
    """Text in, text out: load the pair and rule (:func:`load_generator`'s keywords: ``run_dir``, ``model``,
    ``target``/``draft``/``tokenizer``, ``judge``, ``policy``, ``threshold``) and decode one prompt
    (:class:`Generator`'s keywords: ``max_new_tokens``, ``gamma``, ``do_sample``, ``temperature``, ``seed``,
    ``system``, ``chat``, ``stream``, ``static_cache``)."""
    load = {k: kwargs.pop(k) for k in _LOAD_KEYS if k in kwargs}
    return load_generator(**load)(prompt, **kwargs)[0]
