"""Hydra hooks of the stage CLIs: a callback named in conf/selfjudge.yaml and the resolver of --help."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

if not OmegaConf.has_resolver("section"):  # ${section:eval} in a --help template: that section as YAML
    OmegaConf.register_new_resolver(
        "section",
        lambda name, *, _root_: OmegaConf.to_yaml(OmegaConf.select(_root_, name)).replace("$", "$$"),
        use_cache=False,
    )  # $$: hydra fills the template with string.Template, which reads ${run_dir} as a slot


class CheckRunDir(Callback):
    """Stop with a message naming ``run_dir`` before hydra makes its log folders inside it (on_run_start runs
    before the job's folder is made)."""

    def _check(self, config: DictConfig) -> None:
        from selfjudge.io import check_writable

        try:
            check_writable(str(config.run_dir), "run_dir")
        except PermissionError as e:  # hydra turns a callback's Exception into a warning: stop here instead
            raise SystemExit(f"error: {e}") from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)
