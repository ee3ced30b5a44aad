"""`adakd eval RUN_DIR` scores last.pth by default (the number to compare), best.pth with --checkpoint best."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adakd import models
from adakd.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A one-epoch digits run, and its last-epoch test top-1 as the CLI prints it."""
    out = tmp_path_factory.mktemp("eval")
    assert main(["train", "--preset", "demo", f"out_dir={out}", "name=r", "optim.epochs=1", "optim.milestones=[]",
                 "data.train_size=64", "data.image_size=8", "log.progress=false", "log.tensorboard=false",
                 "model.name=resnet8"]) == 0
    summary = json.loads((out / "r" / "summary.json").read_text())
    return out / "r", f"{summary['last_acc1']:.2f}"


def scored(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out.strip()


def test_eval_of_a_run_folder_scores_last_epoch_by_default(run: tuple[Path, str], capsys) -> None:
    folder, last_acc1 = run
    # best.pth of another epoch with untrained weights, so scoring it instead of last.pth would show.
    state = torch.load(folder / "last.pth", weights_only=True)
    torch.manual_seed(99)
    state["model"], state["epoch"] = models.create("resnet8", num_classes=10).state_dict(), 7
    torch.save(state, folder / "best.pth")

    line = scored(capsys, ["eval", str(folder)])
    assert f" from {folder / 'last.pth'}, last epoch (1): top-1 {last_acc1}%  top-5 " in line
    assert scored(capsys, ["eval", str(folder), "--checkpoint", "last"]) == line

    best = scored(capsys, ["eval", str(folder), "--checkpoint", "best"])
    assert f" from {folder / 'best.pth'}, best epoch (7): top-1 " in best


def test_eval_of_a_bare_checkpoint_names_no_epoch(run: tuple[Path, str], capsys, tmp_path: Path) -> None:
    folder, last_acc1 = run
    path = tmp_path / "weights.pth"
    torch.save(torch.load(folder / "last.pth", weights_only=True)["model"], path)
    line = scored(capsys, ["eval", str(path), "model.name=resnet8", "data.name=digits", "data.image_size=8",
                           "data.num_workers=0"])
    assert f" from {path}: top-1 {last_acc1}%  top-5 " in line
