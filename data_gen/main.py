"""selfjudge-data-gen: SelfJudge labels and judge features as sharded datasets.

selfjudge-data-gen model=tiny run_dir=runs/tiny
torchrun --nproc_per_node=8 -m selfjudge.data_gen.main model=qwen25_7b_05b model.device=cuda
"""

import hydra
from omegaconf import DictConfig

import selfjudge.conf.hooks  # noqa: F401  (the ${section:...} resolver of --help)


@hydra.main(config_path="pkg://selfjudge.conf", config_name="cli_data_gen", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from selfjudge.data_gen.stage import run
    from selfjudge.pipeline.stage import write_rank_summary

    write_rank_summary(run(cfg))


if __name__ == "__main__":
    main()
