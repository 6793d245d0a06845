"""GPUs for jobs that share one machine."""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def pin_local_gpus(per_job: int, job_num: int, environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Under submitit's local executor every job sees the same GPUs: keep `per_job` of them, chosen by the
    job's number, so parallel jobs do not share a GPU. Must run before TensorFlow is imported.

    Returns the new CUDA_VISIBLE_DEVICES, or None where nothing needed changing (SLURM already gives
    each job its own GPUs).
    """
    if environ.get("SUBMITIT_EXECUTOR") != "local":
        return None
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) <= per_job:
        return None
    start = job_num * per_job
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[(start + i) % len(visible)] for i in range(per_job))
    return environ["CUDA_VISIBLE_DEVICES"]
