"""scripts/judge_audit.py on a tiny data folder: the head reads its subset of the stored features, the held-out
rows are the head's validation prompts, and every table adds up (shares of what the judge accepts per cut)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfjudge.data_gen.stage import run as data_gen
from selfjudge.features import FeatureSpec
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.shards import open_dataset
from tests.scripts import load_script
from tests.tiny_config import tiny_config


def _script():
    return load_script("judge_audit")


def test_audit_tables_add_up_on_held_out_rows(tmp_path, cache_dir, capsys):
    cfg = tiny_config(
        tmp_path / "run",
        cache_dir,
        "data_gen.features.state_offsets=[-1,0]",
        "data_gen.features.scalars=[target_logp,target_top1_logp,target_gap,kl]",
    )
    data_gen(cfg)
    data = tmp_path / "run" / "data"
    ds, man = open_dataset(data)
    sub = ds.filter(lambda r: r["substituted"])
    prompts = sorted(set(sub["prompt_id"]))
    held = prompts[::2]
    H = int(man["target_model"]["hidden_size"])
    spec = FeatureSpec(layers=[-1], state_offsets=[0], scalars=["target_top1_logp"])  # a subset of the stored
    head = JudgeHead(
        JudgeConfig(
            feature_dim=spec.dim(H, None),
            target_model=man["target_model"],
            features=spec.as_dict(),
            extra={"split": {"val_prompts": held}},
        )
    )
    torch.manual_seed(0)
    with torch.no_grad():
        head.net.weight.normal_(0, 0.3)
    head.save_pretrained(tmp_path / "head")
    ja = _script()
    res = ja.main([str(data), str(tmp_path / "head"), "--examples", "2", "--out", str(tmp_path / "audit")])
    want = sum(1 for p in sub["prompt_id"] if p in held)
    assert res["rows"] == want and res["prompts"] == len(held) and res["held_out_only"]
    assert {r["group"] for r in res["kl_rule"]["by_kind"]} == {"number", "punctuation", "word"}
    for rows in (res["by_kind"], res["by_target_top1"], res["kl_rule"]["by_kind"]):
        assert sum(r["n"] for r in rows) == want
        for q in ("0.1", "0.2", "0.3", "0.4"):
            assert sum(r["accepted"][q]["share"] for r in rows) == pytest.approx(1.0)
    # P(important) by hand from the stored layout: the groups' mean P, weighted, is the mean over held-out rows
    x = np.asarray(sub.filter(lambda r: r["prompt_id"] in held).with_format("numpy")[:]["features"], np.float32)
    cols = spec.columns_in(FeatureSpec.from_mapping(man["features"]), H)
    with torch.no_grad():
        p = head.predict_proba(torch.from_numpy(x[:, cols])).double().numpy()
    for table in ("by_kind", "by_target_top1"):
        got = sum(r["n"] * r["mean_p"] for r in res[table] if r["n"]) / want
        assert got == pytest.approx(p.mean(), rel=1e-5)
    assert res["cuts"]["0.3"] == pytest.approx(float(np.quantile(p, 0.3)), rel=1e-5)
    assert json.loads((tmp_path / "audit.json").read_text())["rows"] == want
    assert "| kind of swap |" in (tmp_path / "audit.md").read_text()
    assert capsys.readouterr().out.count("| number |") == 2  # the judge's table and the KL rule's
    # the rows it was trained on are left out unless asked; a head with no recorded split must say --all
    assert ja.main([str(data), str(tmp_path / "head"), "--all"])["rows"] == len(sub)
    JudgeHead(
        JudgeConfig(feature_dim=spec.dim(H, None), target_model=man["target_model"], features=spec.as_dict())
    ).save_pretrained(tmp_path / "bare")
    with pytest.raises(SystemExit, match="records no validation prompts .* pass --all"):
        ja.main([str(data), str(tmp_path / "bare")])
