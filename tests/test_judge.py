"""The judge head: folder round trip, standardization in fp32, seeded init, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from selfjudge.judge import CONFIG_NAME, WEIGHTS_NAME, JudgeConfig, JudgeHead

D = 12


def _head(kind: str = "logistic", **kw) -> JudgeHead:
    head = JudgeHead(
        JudgeConfig(
            kind=kind,
            feature_dim=D,
            hidden_dim=8,
            dropout=0.1 if kind == "mlp" else 0.0,
            target_model={"name": "t", "fingerprint": "sha256:aa", "hidden_size": D},
            **kw,
        )
    )
    head.init_weights(3)
    head.set_standardization(torch.linspace(-2, 2, D), torch.linspace(0.5, 3, D))
    return head


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_save_and_reload_give_identical_predictions(tmp_path, kind):
    head = _head(kind, thresholds={"youden": 0.4, "quantiles": [0.1, 0.9]}, label_source="autojudge")
    head.eval()
    x = torch.randn(64, D) * 5
    head.save_pretrained(tmp_path / "h")
    again = JudgeHead.from_pretrained(tmp_path / "h")
    assert torch.equal(head.predict_proba(x), again.predict_proba(x))
    assert again.config == head.config
    assert torch.equal(again.mean, head.mean) and torch.equal(again.std, head.std)
    saved = json.loads((tmp_path / "h" / CONFIG_NAME).read_text())
    assert saved["feature_dim"] == D and saved["target_model"]["fingerprint"] == "sha256:aa"
    assert saved["features"] == {"layers": [-1], "include_draft": False} and saved["label_source"] == "autojudge"
    from safetensors.torch import load_file

    assert {"mean", "std"} <= set(load_file(str(tmp_path / "h" / WEIGHTS_NAME)))
    head.save_pretrained(tmp_path / "h")  # overwriting leaves one complete folder, no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]


def test_logistic_is_one_linear_layer_on_standardized_input():
    head = _head()
    x = torch.randn(5, D)
    z = ((x - head.mean) / head.std) @ head.net.weight[0] + head.net.bias[0]
    assert torch.allclose(head(x), z, atol=1e-6)
    assert [n for n, _ in head.named_parameters()] == ["net.weight", "net.bias"]


def test_standardization_stays_fp32_under_a_bf16_net():
    head = _head()
    head.set_standardization(torch.full((D,), 300.0), torch.full((D,), 0.01))
    x = torch.full((1, D), 300.005)
    z32 = head(x)
    head.net.to(torch.bfloat16)
    assert head.mean.dtype == torch.float32
    assert torch.allclose(head.standardize(x), torch.full((1, D), 0.5), atol=1e-2)  # bf16 would round 300.005 to 300
    assert torch.allclose(head(x), z32, atol=0.1)


def test_init_is_seeded():
    a, b = _head("mlp"), _head("mlp")
    torch.manual_seed(123)  # the global RNG does not matter
    c = _head("mlp")
    for (k, v), w, u in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(v, w) and torch.equal(v, u), k
    assert not torch.equal(JudgeHead(a.config).init_weights(4).net[0].weight, a.net[0].weight)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="judge.kind"):
        JudgeConfig(kind="svm", feature_dim=4)
    with pytest.raises(ValueError, match="judge.hidden_dim"):
        JudgeConfig(kind="mlp", feature_dim=4, hidden_dim=0)
    with pytest.raises(ValueError, match="feature_dim"):
        JudgeConfig(feature_dim=0)
    head = _head()
    with pytest.raises(ValueError, match="expects 12 features, got 7"):
        head(torch.randn(2, 7))
    with pytest.raises(ValueError, match="trained for target 't'"):
        head.check_compatible({"name": "other", "fingerprint": "sha256:bb"}, D)
    with pytest.raises(ValueError, match="expects 12 features, the target gives 24"):
        head.check_compatible({"name": "t", "fingerprint": "sha256:aa", "hidden_size": 24}, 24)
    head.check_compatible({"name": "t", "fingerprint": "sha256:aa"}, D)
    with pytest.raises(FileNotFoundError, match="not a judge head folder"):
        JudgeHead.from_pretrained(tmp_path)
    head.save_pretrained(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / CONFIG_NAME).read_text())
    (tmp_path / "h" / CONFIG_NAME).write_text(json.dumps({**cfg, "surprise": 1}))
    with pytest.raises(ValueError, match="unknown keys.*surprise"):
        JudgeHead.from_pretrained(tmp_path / "h")
