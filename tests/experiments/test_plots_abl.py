"""ABL figures of `adakd plot`: gamma trajectories, per-block accuracy (with --compare), per-epoch p1.

The run folders are written by hand in the formats the ABL strategy logs (spec §11): metrics.csv with
`test/block_acc/block<l>` and `train/abl/p1/block<l>` columns, and abl_gamma.csv for stage-1 search runs.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from adakd.cli import main
from adakd.experiments.plots import plot_run
from adakd.strategies.abl import BLOCK_ACCURACY

_block_accuracy = BLOCK_ACCURACY.by_blocks  # the per-block values moved with ABL's declared figure

ABL_FIGURES = {"accuracy.png", "losses.png", "abl_p1.png", "gamma_trajectories.png", "block_accuracy.png"}


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_run(folder: Path, blocks: int = 4, epochs: int = 3, abl: bool = True, gamma: bool = True) -> Path:
    """A run folder; head accuracies are logged at the last epoch only, so earlier rows leave them empty."""
    folder.mkdir(parents=True)
    rng = random.Random(folder.name)
    rows = []
    for epoch in range(1, epochs + 1):
        row: dict[str, object] = {"epoch": epoch, "train/loss": 3.0 / epoch, "train/acc1": 20.0 * epoch,
                                  "train/ce": 1.5 / epoch, "train/kd/logits": 1.0 / epoch}
        if abl:
            row.update({f"train/abl/local_ce/block{b}": 2.0 / epoch for b in range(1, blocks)})
            row.update({f"train/abl/p1/block{b}": rng.uniform(0, 1) for b in range(1, blocks)})
        row.update({"test/acc1": 15.0 * epoch, "test/acc5": 30.0 * epoch})
        if abl and epoch == epochs:
            row.update({f"test/block_acc/block{b}": 10.0 * b + rng.uniform(0, 5) for b in range(1, blocks)})
        rows.append(row)
    write_csv(folder / "metrics.csv", rows)
    if gamma:
        gamma_rows = []
        for step in range(0, 1000, 100):
            phase = "warm" if step < 400 else "meta"
            row = {"step": step, "epoch": step // 500, "phase": phase}
            for b in range(1, blocks):
                row[f"p1/block{b}"] = 0.5 if phase == "warm" else 0.5 + 0.4 * b / blocks * (step - 400) / 500
            for b in range(1, blocks):
                row[f"p2/block{b}"] = 1 - row[f"p1/block{b}"]
            for b in range(1, blocks):
                row[f"hypergrad/block{b}"] = 0.0 if phase == "warm" else 0.1
            gamma_rows.append(row)
        write_csv(folder / "abl_gamma.csv", gamma_rows)
    return folder


@pytest.fixture
def legends(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The legend entries of every figure saved, by file name."""
    seen: dict[str, list[str]] = {}
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        legend = fig.axes[0].get_legend()
        seen[Path(path).name] = [text.get_text() for text in legend.get_texts()] if legend else []
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return seen


def assert_pngs(folder: Path, names: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == names
    for name in names:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (folder / name).stat().st_size > 1000


def test_abl_search_run_gets_every_figure(tmp_path: Path, legends: dict[str, list[str]]) -> None:
    run = write_run(tmp_path / "adaptive", blocks=4)
    paths = plot_run(run)
    assert {p.name for p in paths} == ABL_FIGURES
    assert_pngs(run / "plots", ABL_FIGURES)
    assert legends["gamma_trajectories.png"] == ["block1", "block2", "block3", "warm start"]
    assert legends["abl_p1.png"] == ["abl/p1/block1", "abl/p1/block2", "abl/p1/block3"]
    assert legends["block_accuracy.png"] == ["adaptive"]
    assert legends["accuracy.png"] == ["train/acc1", "test/acc1", "test/acc5"]
    # Student weights are not loss terms; the heads' local CE is.
    assert not any("p1" in label for label in legends["losses.png"])
    assert "abl/local_ce/block1" in legends["losses.png"] and "ce" in legends["losses.png"]


def test_missing_gamma_csv_skips_only_that_figure(tmp_path: Path) -> None:
    run = write_run(tmp_path / "stage2", gamma=False)
    assert {p.name for p in plot_run(run, tmp_path / "out")} == ABL_FIGURES - {"gamma_trajectories.png"}
    assert_pngs(tmp_path / "out", ABL_FIGURES - {"gamma_trajectories.png"})


def test_header_only_gamma_csv_is_skipped(tmp_path: Path) -> None:
    run = write_run(tmp_path / "started", gamma=False)
    (run / "abl_gamma.csv").write_text("step,epoch,phase,p1/block1,p2/block1,hypergrad/block1\n")
    assert "gamma_trajectories.png" not in {p.name for p in plot_run(run)}


def test_many_blocks_get_a_colour_bar(tmp_path: Path, legends: dict[str, list[str]]) -> None:
    run = write_run(tmp_path / "resnet32", blocks=15)
    plot_run(run)
    assert legends["gamma_trajectories.png"] == ["warm start"]
    assert (run / "plots" / "gamma_trajectories.png").stat().st_size > 1000


def test_standard_run_gets_no_abl_figure(tmp_path: Path) -> None:
    run = write_run(tmp_path / "standard", abl=False, gamma=False)
    assert {p.name for p in plot_run(run)} == {"accuracy.png", "losses.png"}


def test_block_accuracy_follows_block_numbers_not_column_order(tmp_path: Path) -> None:
    row = {"epoch": 1.0, "test/acc1": 70.0}
    order = list(range(1, 12))
    random.Random(0).shuffle(order)
    row.update({f"test/block_acc/block{b}": float(b) for b in order})
    blocks, accuracy = _block_accuracy([{"epoch": 0.0}, row])
    assert blocks == list(range(1, 13))
    assert accuracy == [float(b) for b in range(1, 12)] + [70.0]
    assert _block_accuracy([{"epoch": 1.0, "test/acc1": 70.0}]) is None


def test_cli_compare_overlays_runs_by_folder_name(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  legends: dict[str, list[str]]) -> None:
    adaptive, fixed = write_run(tmp_path / "adaptive"), write_run(tmp_path / "fixed", gamma=False)
    out = tmp_path / "figures"
    assert main(["plot", str(adaptive), "--compare", str(fixed), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == ABL_FIGURES
    assert_pngs(out, ABL_FIGURES)
    assert legends["block_accuracy.png"] == ["adaptive", "fixed"]


def test_cli_compare_without_metrics_fails_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, missing = write_run(tmp_path / "adaptive"), tmp_path / "no_such_run"
    assert main(["plot", str(run), "--compare", str(missing)]) == 2
    error = capsys.readouterr().err
    assert str(missing / "metrics.csv") in error and "adakd: error" in error
    assert not (run / "plots").exists(), "no figure is drawn when a comparison run is wrong"


def test_cli_compare_with_a_run_without_heads_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    adaptive, standard = write_run(tmp_path / "adaptive"), write_run(tmp_path / "standard", abl=False, gamma=False)
    assert main(["plot", str(adaptive), "--compare", str(standard)]) == 2
    assert str(standard) in capsys.readouterr().err
    assert main(["plot", str(standard), "--compare", str(adaptive)]) == 2
    assert "block_accuracy" in capsys.readouterr().err
