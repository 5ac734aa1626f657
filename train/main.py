"""selfjudge-train: fit the judge head on data_gen's shards with DeepSpeed.

selfjudge-train run_dir=runs/qwen                                   # one process (plain python)
torchrun --nproc_per_node=2 -m selfjudge.train.main run_dir=runs/qwen
deepspeed --no_local_rank --num_gpus 8 -m selfjudge.train.main run_dir=runs/qwen train.device=cuda
selfjudge-train -m +hparams_search=judge_grid run_dir=runs/qwen     # sweep, then:
python -m selfjudge.train.select runs/qwen/multirun/<time>          # best head -> runs/qwen/judge/best
"""

import hydra
from omegaconf import DictConfig

import selfjudge.conf.hooks  # noqa: F401  (the ${section:...} resolver of --help)


@hydra.main(config_path="pkg://selfjudge.conf", config_name="cli_train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from selfjudge.train.stage import run

    return run(cfg)["roc_auc"]  # returned for hydra sweepers


if __name__ == "__main__":
    main()
