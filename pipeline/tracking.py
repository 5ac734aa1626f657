"""One wandb run per stage, opened the same way by data_gen, train and eval (rank 0 only).

The library (``selfjudge/``) never imports wandb; the stages call :func:`start_run` on rank 0 when
``logger=wandb`` (``logger=none``: no run). ``logger.mode`` is wandb's own (``online``, ``offline``, ``disabled``).
"""

from __future__ import annotations

from typing import Any


def start_run(plain: dict, job: str) -> Any:
    """A wandb run for stage ``job`` of the resolved config ``plain``: its project, entity, mode, tags
    (the logger's plus ``job``) and group, the whole config, files under the run folder."""
    import wandb

    lg = plain["logger"]
    return wandb.init(
        project=lg["project"],
        entity=lg["entity"],
        mode=lg["mode"],
        tags=[*lg["tags"], job],
        config=plain,
        dir=plain["run_dir"],
        job_type=job,
        group=lg.get("group"),
        reinit="finish_previous",
    )
