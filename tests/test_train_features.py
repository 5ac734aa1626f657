"""train.features: a head trained on a subset of a wide data folder's features is the head trained on a
folder generated with that subset (tiny pair, real data_gen and train stages)."""

from __future__ import annotations

import pytest
import torch

from selfjudge.data_gen.stage import run as data_gen
from selfjudge.features import SCALARS, FeatureSpec
from selfjudge.judge import JudgeHead
from selfjudge.shards import open_dataset
from selfjudge.train.stage import run as train
from tests.tiny_config import tiny_config

WIDE = FeatureSpec(layers=(1, -1), include_draft=True, state_offsets=(-1, 0), scalars=SCALARS)
NARROW = {"state_offsets": [-1, 0], "scalars": ["target_logp", "target_top1_logp", "target_gap"]}


def _compose(run_dir, cache_dir, *extra):
    return tiny_config(
        run_dir,
        cache_dir,
        "data_gen.tau.mode=value",
        "data_gen.tau.value=0.3",
        "train.epochs=2",
        "train.device=cpu",
        *extra,
    )


def _layout(spec: dict) -> list[str]:
    return [f"data_gen.features.{k}={v}".replace("'", "").replace(" ", "") for k, v in spec.items()]


def test_columns_in_picks_each_part_in_the_subsets_order():
    H, Hd = 4, 3
    x = list(range(WIDE.dim(H, Hd)))  # column i holds i
    cols = WIDE.columns(H, Hd)
    sub = FeatureSpec(layers=(-1, 1), state_offsets=(0,), include_draft=True, scalars=("kl", "target_logp"))
    got = sub.columns_in(WIDE, H, Hd)
    s0 = cols["state@0"].start
    assert got == [
        *range(s0 + H, s0 + 2 * H),  # layer -1 is the second stored layer
        *range(s0, s0 + H),
        *range(cols["draft"].start, cols["draft"].stop),
        cols["kl"].start,
        cols["target_logp"].start,
    ]
    assert [x[i] for i in WIDE.columns_in(WIDE, H, Hd)] == x  # the whole layout is itself
    with pytest.raises(ValueError, match="missing layers 0 "):
        FeatureSpec(layers=(0,)).columns_in(WIDE, H, Hd)
    with pytest.raises(ValueError, match="missing state_offsets -1, include_draft, scalars kl"):
        FeatureSpec(state_offsets=(-1,), include_draft=True, scalars=("kl",)).columns_in(FeatureSpec(), H, Hd)


def test_head_on_a_subset_of_a_wide_folder_equals_the_head_on_a_narrow_folder(tmp_path, cache_dir):
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    data_gen(_compose(wide, cache_dir, *_layout(WIDE.as_dict())))
    data_gen(_compose(narrow, cache_dir, *_layout(NARROW)))
    ds_w, man_w = open_dataset(wide / "data")
    ds_n, man_n = open_dataset(narrow / "data")
    H, Hd = man_w["target_model"]["hidden_size"], man_w["draft_model"]["hidden_size"]
    cols = FeatureSpec.from_mapping(NARROW).columns_in(WIDE, H, Hd)
    fw = ds_w.with_format("torch", columns=["features"])[:]["features"]
    fn = ds_n.with_format("torch", columns=["features"])[:]["features"]
    assert fw.shape == (len(ds_n), WIDE.dim(H, Hd)) and fn.shape[1] == len(cols) < fw.shape[1]
    assert torch.equal(fw[:, cols], fn)  # the stored narrow layout is exactly those columns of the wide one

    sub = "train.features={state_offsets:[-1,0],scalars:[target_logp,target_top1_logp,target_gap]}"
    train(_compose(wide, cache_dir, sub))
    train(_compose(narrow, cache_dir))
    a = JudgeHead.from_pretrained(wide / "judge" / "head")
    b = JudgeHead.from_pretrained(narrow / "judge" / "head")
    assert FeatureSpec.from_mapping(a.config.features) == FeatureSpec.from_mapping(NARROW)
    assert a.config.feature_dim == b.config.feature_dim == len(cols)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.thresholds == b.config.thresholds
    # train.use_negatives=auto (the default): a head reading scalars trains on the mismatches alone (an
    # original-token row is trivially label 0 there), a head on states alone also on the original-token rows
    subs = int(sum(ds_n["substituted"]))
    assert a.config.extra["use_negatives"] is False and 0 < subs < len(ds_n)
    assert sum(a.config.extra["split"][k] for k in ("n_train_rows", "n_val_rows")) == subs
    train(_compose(wide, cache_dir, "train.features={state_offsets:[0]}", f"train.output_dir={wide / 'states'}"))
    c = JudgeHead.from_pretrained(wide / "states" / "head").config
    assert c.extra["use_negatives"] is True and c.extra["split"]["n_train_rows"] + c.extra["split"][
        "n_val_rows"
    ] == len(ds_w)


def test_features_not_stored_are_refused_by_name(tmp_path, cache_dir):
    data_gen(_compose(tmp_path, cache_dir, *_layout(NARROW)))
    with pytest.raises(ValueError, match="train.features: .*missing include_draft, scalars kl"):
        train(_compose(tmp_path, cache_dir, "train.features={include_draft:true,scalars:[kl]}"))
    with pytest.raises(ValueError, match="train.features: unknown feature key"):
        train(_compose(tmp_path, cache_dir, "train.features={layer:[1]}"))


def test_unset_features_keep_the_keys_of_heads_trained_before_the_option(tmp_path, cache_dir):
    """train.features=null is left out of the train keys, so runs made before the option keep theirs."""
    from omegaconf import OmegaConf

    from selfjudge.pipeline.stage import stage_hashes
    from selfjudge.train.stage import settings_from

    cfg = _compose(tmp_path, cache_dir)
    before = OmegaConf.to_container(cfg, resolve=True)
    del before["train"]["features"]  # a config composed before train.features existed
    old = OmegaConf.create(before)
    assert stage_hashes(cfg) == stage_hashes(old)
    sub = _compose(tmp_path, cache_dir, "train.features={scalars:[kl]}")
    assert stage_hashes(sub)["train"] != stage_hashes(cfg)["train"]
    assert stage_hashes(sub)["data_gen"] == stage_hashes(cfg)["data_gen"]
    run_key = [settings_from(OmegaConf.to_container(c, resolve=True)).run_key for c in (cfg, sub)]
    assert run_key[0] != run_key[1]  # the trainer's resume key sees the option once it is used
