"""The slurm launcher's jobs, on submitit (the optional extra `adakd[slurm]`).

Each cell is one job of an array; a pre-empted or timed-out job is requeued (`Checkpointable`) and the cell resumes
from its last checkpoint. A cell with several GPUs runs one task per GPU under torch.distributed.
"""
from __future__ import annotations

from typing import Any

from adakd.experiments.sweep import Cell, Sweep, SweepError, run_cell

try:
    import submitit
except ImportError:  # the error is raised when the launcher is asked for
    submitit = None

# Job settings a grid's `slurm:` section or `--slurm KEY=VALUE` may give, passed to submitit as they are.
DEFAULTS: dict[str, Any] = {"timeout_min": 24 * 60, "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32}


if submitit is not None:
    class CellJob(submitit.helpers.Checkpointable):
        """One cell as a submitit job; requeued as it is on pre-emption (the cell resumes from last.pth)."""

        def __init__(self, root: str, name: str, runtime: list[str], distributed: bool) -> None:
            self.root, self.name, self.runtime, self.distributed = root, name, runtime, distributed

        def __call__(self) -> dict[str, Any]:
            if self.distributed:  # RANK, WORLD_SIZE, MASTER_ADDR... from slurm's task layout
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return run_cell(self.root, self.name, self.runtime)


def require_submitit() -> None:
    """One error saying how to install submitit, if it is missing."""
    if submitit is None:
        raise SweepError("--launcher slurm needs submitit: pip install \"adakd[slurm]\"")


def executor_for(sweep: Sweep, parameters: dict[str, Any], jobs: int) -> Any:
    """A submitit executor writing its job files under <sweep>/slurm; `cluster=local` runs jobs on this machine."""
    require_submitit()
    cluster = parameters.pop("cluster", None)
    executor = submitit.AutoExecutor(folder=str(sweep.root / "slurm" / "%j"), cluster=cluster)
    settings = {**DEFAULTS, **parameters}
    gpus = int(settings.get("gpus_per_node", 1))
    if cluster in ("local", "debug"):
        settings.pop("mem_gb", None)
        settings.pop("cpus_per_task", None)
        settings["gpus_per_node"] = gpus = 0 if gpus and not _has_cuda() else gpus
    try:
        executor.update_parameters(name=f"adakd-{sweep.root.name}", tasks_per_node=max(1, gpus),
                                   slurm_array_parallelism=jobs, **settings)
    except (TypeError, ValueError, NameError) as err:
        raise SweepError(f"--slurm settings: {err}") from None
    executor.cells_distributed = gpus > 1
    return executor


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def submit(executor: Any, sweep: Sweep, cells: list[Cell]) -> list[Any]:
    """Submit the cells as one job array; return the jobs in the cells' order."""
    runtime = ["log.progress=false"]
    with executor.batch():
        jobs = [executor.submit(CellJob(str(sweep.root), cell.name, runtime, executor.cells_distributed))
                for cell in cells]
    return jobs
