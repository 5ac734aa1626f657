"""selfjudge-pipeline: data_gen -> train -> eval under one config and one run folder.

selfjudge-pipeline experiment=quickstart     # the real offline Qwen pair, laptop size
selfjudge-pipeline experiment=tiny           # tiny random pair, under a minute
"""

import hydra
from omegaconf import DictConfig

import selfjudge.conf.hooks  # noqa: F401  (the ${section:...} resolver of --help)


@hydra.main(config_path="pkg://selfjudge.conf", config_name="cli_pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from selfjudge.pipeline.stage import run

    run(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
