"""selfjudge-eval: speculative decoding with the judge vs target-only, lossless SD and baselines.

selfjudge-eval run_dir=runs/qwen eval.gamma=8 dataset@eval.dataset=gsm8k_test
"""

import hydra
from omegaconf import DictConfig

import selfjudge.conf.hooks  # noqa: F401  (the ${section:...} resolver of --help)


@hydra.main(config_path="pkg://selfjudge.conf", config_name="cli_eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from selfjudge.eval.stage import run
    from selfjudge.pipeline.stage import write_rank_summary

    write_rank_summary(run(cfg))


if __name__ == "__main__":
    main()
