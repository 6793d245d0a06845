"""CPU, memory and GPU use while a run trains, as MLflow's `system/...` metrics (`tracking.system_metrics`).

MLflow's collectors (`CPUMonitor`, `GPUMonitor`) take the samples, but not its `SystemMetricsMonitor`
(`log_system_metrics=True`): that logs straight to the store, so a tracking server that is away loses the
samples and stops the monitor for good, and it watches every GPU of the node. Here the samples go through
the run's outbox like its other metrics, and only the GPUs in `CUDA_VISIBLE_DEVICES` are watched, named
`gpu_0`, `gpu_1`... in the job's own order (TensorFlow's `/GPU:0`, ...). A metric's step is the seconds since
the run started, so a resumed run's samples go on after its earlier ones.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.outbox import Outbox

log = logging.getLogger(__name__)

PREFIX = "system/"


@contextlib.contextmanager
def sampling(box: Outbox, interval_s: float, started_ms: int, visible_gpus: str | None) -> Iterator[None]:
    """Sample every `interval_s` seconds on a thread while the block runs, and once more at its end."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    monitors = [CPUMonitor(), *filter(None, [_gpu_monitor(visible_gpus)])]
    done = threading.Event()

    def sample() -> None:
        for monitor in monitors:
            monitor.collect_metrics()
        values = {f"{PREFIX}{k}": v for m in monitors for k, v in m.aggregate_metrics().items()}
        for monitor in monitors:
            monitor.clear_metrics()
        box.metrics(values, step=round(time.time() - started_ms / 1000))
        box.send()

    def loop() -> None:
        while not done.wait(interval_s):
            try:
                sample()
            except Exception as exc:  # a sample lost is no reason to stop the next one, nor the training
                log.debug("system metrics: %s", exc)

    monitors[0].collect_metrics()  # psutil's CPU percentage counts from its previous call: prime it
    monitors[0].clear_metrics()
    thread = threading.Thread(target=loop, name="workbench-system-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(Exception):
            sample()


def _gpu_monitor(visible: str | None) -> Any:
    """MLflow's GPU collector over the GPUs in `visible` (CUDA_VISIBLE_DEVICES: NVML indices, as nvidia-smi
    and SLURM number them, or GPU UUIDs), all of them when it is unset; None without a GPU or nvidia-ml-py."""
    try:
        import pynvml
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitor = GPUMonitor()
    except Exception:  # no nvidia-ml-py, no driver, no GPU
        return None
    if visible is not None:
        handles = []
        for device in (d.strip() for d in visible.split(",") if d.strip()):
            try:
                if device.startswith(("GPU-", "MIG-")):
                    handles.append(pynvml.nvmlDeviceGetHandleByUUID(device))
                else:
                    handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(device)))
            except (ValueError, pynvml.NVMLError):
                log.warning("system metrics: CUDA_VISIBLE_DEVICES names %s, which NVML does not know", device)
        monitor.gpu_handles, monitor.num_gpus = handles, len(handles)
    return monitor if monitor.gpu_handles else None
