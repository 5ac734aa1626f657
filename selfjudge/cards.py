"""Hub cards (README.md with YAML metadata) for the two things a run shares: a judge head folder and a
data_gen folder. Both are made from the JSON the folder already holds (``judge_config.json``,
``manifest.json``), so a card never says more than the run recorded.

The dataset card's ``configs`` entry points the ``datasets`` library at ``shards/*.parquet``: without
it, ``datasets.load_dataset("<run>/data")`` reads the JSON sidecar files as data and fails.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from selfjudge.io import atomic_write_text

DATASET_CARD = "README.md"


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _model_line(role: str, m: Mapping[str, Any]) -> str:
    if not m:
        return f"| {role} | (not recorded) | | |"
    return (
        f"| {role} | `{m.get('name')}` ({m.get('source')}, {m.get('model_type')}, {m.get('num_layers')} layers, "
        f"hidden {m.get('hidden_size')}) | `{m.get('fingerprint')}` | {m.get('vocab_size')} |"
    )


def judge_model_card(config: Mapping[str, Any], card_data: ModelCardData | None = None, **_: Any) -> ModelCard:
    """The model card of a judge head, from its ``judge_config.json`` contents."""
    tgt, drf = config.get("target_model") or {}, config.get("draft_model") or {}
    feats = config.get("features") or {}
    extra = config.get("extra") or {}
    data = ModelCardData(**(card_data.to_dict() if card_data is not None else {}))
    if tgt.get("source") == "hub" and tgt.get("name"):
        data.base_model = tgt["name"]
    metrics = {k: v for k, v in (config.get("metrics") or {}).items() if not isinstance(v, (dict, list))}
    points = {k: v for k, v in (config.get("thresholds") or {}).items() if not isinstance(v, (dict, list))}
    at = (config.get("metrics") or {}).get("at_thresholds") or {}
    qs = (config.get("thresholds") or {}).get("quantiles") or []
    levels = (config.get("thresholds") or {}).get("quantile_levels") or []
    tau = extra.get("tau")
    lines = [
        f"# selfjudge judge head ({config.get('kind')})",
        "",
        "A judge for speculative decoding: a small classifier on the target model's hidden states that says",
        "whether a draft token that differs from the target's choice is *important* (P(important) high: reject)",
        "or harmless (accept). Trained with selfjudge.",
        "",
        "```python",
        "from selfjudge.judge import JudgeHead",
        "from selfjudge.generate import judge_generate",
        'head = JudgeHead.from_pretrained("<this repo or folder>")',
        "out = target.generate(**inputs, custom_generate=judge_generate, assistant_model=draft, judge=head,",
        "                      judge_threshold=0.5, max_new_tokens=256)",
        "```",
        "",
        "## The model pair it was trained for",
        "",
        "| role | model | fingerprint | vocab |",
        "|---|---|---|---|",
        _model_line("target", tgt),
        _model_line("draft", drf),
        "",
        "The head refuses a target whose fingerprint differs (`check_compatible`).",
        "",
        "## Features and labels",
        "",
        f"- head: `{config.get('kind')}`, {config.get('feature_dim')} inputs"
        + (f", hidden width {config.get('hidden_dim')}" if config.get("kind") == "mlp" else ""),
        f"- feature layout: target layers {feats.get('layers')} at positions {feats.get('state_offsets', [0])} "
        "(0: after the draft token, -1: the state whose output judges it)"
        + (", plus the draft's last hidden state" if feats.get("include_draft") else "")
        + (f", plus the rule quantities {feats['scalars']}" if feats.get("scalars") else "")
        + " (standardised with the training mean and std stored in the weights)",
        f"- label source: `{config.get('label_source')}` (1 = important = reject)",
        f"- τ (LD threshold that made the labels): {_fmt(tau) if tau is not None else 'see the data manifest'}",
        "",
        "## Validation",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in metrics.items()],
        "",
        "## Operating points (cuts on P(important); accept a mismatch iff P < cut)",
        "",
        "| point | cut | precision | recall |",
        "|---|---|---|---|",
        *[
            f"| {k} | {_fmt(v)} | {_fmt((at.get(k) or {}).get('precision', ''))} | "
            f"{_fmt((at.get(k) or {}).get('recall', ''))} |"
            for k, v in points.items()
        ],
    ]
    if qs:
        lines += [
            "",
            "Quantiles of P(important) on the validation rows: "
            + ", ".join(f"{_fmt(lv)}: {_fmt(q)}" for lv, q in zip(levels, qs))
            + ".",
        ]
    lines += ["", "The full record is `judge_config.json` in this folder."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def dataset_card(manifest: Mapping[str, Any]) -> DatasetCard:
    """The dataset card of a data_gen folder, from its manifest."""
    data = DatasetCardData(
        license="apache-2.0",
        tags=["speculative-decoding", "selfjudge"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.parquet"}]}],
    )
    c = manifest.get("counts") or {}
    tgt, drf = manifest.get("target_model") or {}, manifest.get("draft_model") or {}
    lines = [
        "# selfjudge judge-training records",
        "",
        "One row per scored token of the target's own responses: the draft's token at a mismatch (or a matching",
        "token, `substituted = false`), the log-likelihood drop `ld` of the rest of the response when the draft",
        "token is swapped in, the label (1 = important: `ld > τ`) and the target hidden-state features the judge",
        "reads. Made by `selfjudge-data-gen`; `manifest.json` holds the full record.",
        "",
        "```python",
        "import datasets",
        'ds = datasets.load_dataset("<this folder or repo>", split="train")',
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| target | `{tgt.get('name')}` `{tgt.get('fingerprint')}` |",
        f"| draft | `{drf.get('name')}` `{drf.get('fingerprint')}` |",
        f"| task | {manifest.get('task')} |",
        f"| features | layers {(manifest.get('features') or {}).get('layers')}, {manifest.get('feature_dim')} values "
        f"({manifest.get('feature_dtype')}) |",
        f"| τ | {_fmt(manifest.get('tau'))} (rule {json.dumps(manifest.get('tau_rule'))}) |",
        f"| records | {c.get('records')} ({c.get('mismatches')} mismatches, {c.get('positives')} important) |",
        f"| prompts | {c.get('prompts')} |",
        f"| positive rate | {_fmt(manifest.get('positive_rate'))} |",
        f"| config hash | {manifest.get('config_hash')} |",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_dataset_card(folder: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``README.md`` into a data folder (atomically) so that ``datasets.load_dataset(folder)`` reads
    the shards, and ``huggingface_hub.HfApi().upload_folder(repo_type="dataset", ...)`` shares it."""
    path = Path(folder) / DATASET_CARD
    atomic_write_text(path, str(dataset_card(manifest)))
    return path
