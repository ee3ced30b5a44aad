"""A resumed run redoes the epochs after its checkpoint; TensorBoard must not show them twice."""
from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adakd.engine.runs import RunDir


def scalars(path):
    events = EventAccumulator(str(path / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_resume_purges_epochs_logged_after_the_checkpoint(tmp_path):
    first = RunDir(tmp_path)
    for epoch in (1, 2, 3):  # epochs 2 and 3 reached TensorBoard, then the run was killed before their checkpoint
        first.log_epoch({"epoch": epoch, "train/loss": float(epoch)})
    first.close()
    resumed = RunDir(tmp_path)
    resumed.resume([{"epoch": 1, "train/loss": 1.0}])
    for epoch in (2, 3):
        resumed.log_epoch({"epoch": epoch, "train/loss": 10.0 * epoch})
    resumed.close()
    assert scalars(tmp_path) == [(1, 1.0), (2, 20.0), (3, 30.0)]
