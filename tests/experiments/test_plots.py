"""What every figure of `adakd plot` shows: the run's name, integer epochs, visible short curves, fixed share
range, ABL's warm start as configured, and an `adakd abl` folder plotted stage by stage."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure

from adakd.cli import main
from adakd.experiments.plots import MARKERS_BELOW, plot_run
from adakd.strategies.abl_options import ABLOptions
from test_plots_abl import write_csv


def write_run(folder: Path, epochs: int = 3, shares: bool = False, gamma_steps: tuple[int, ...] = (),
              warm_steps: int | None = None, strategy: str | None = None, args: dict | None = None) -> Path:
    """A run folder in the formats the trainer writes (metrics.csv, abl_gamma.csv, config.yaml)."""
    folder.mkdir(parents=True)
    rows = []
    for epoch in range(1, epochs + 1):
        row: dict[str, object] = {"epoch": epoch, "train/loss": 2.0 / epoch, "train/acc1": 30.0 + epoch,
                                  "train/ce": 1.0 / epoch, "test/acc1": 25.0 + epoch, "test/acc5": 60.0 + epoch}
        if shares:  # SAKD's shares hover near 1: autoscaling would stretch 0.99-1.0 over the whole axis
            row.update({"train/share/stage2": 1.0 - 0.001 * epoch, "train/share/logits": 0.995})
        rows.append(row)
    write_csv(folder / "metrics.csv", rows)
    if gamma_steps:
        write_csv(folder / "abl_gamma.csv", [
            {"step": step, "epoch": 0, "phase": "warm" if step < (warm_steps or 0) else "meta",
             "p1/block1": 0.5, "p2/block1": 0.5, "p1/block2": 0.5, "p2/block2": 0.5} for step in gamma_steps])
    if strategy:
        args = {**({} if warm_steps is None else {"warm_steps": warm_steps}), **(args or {})}
        (folder / "config.yaml").write_text(yaml.safe_dump({"strategy": {"name": strategy, "args": args}}))
    return folder


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """Title, axis limits, ticks, markers, dashed lines and shaded spans of every figure saved, by file name."""
    seen: dict[str, dict] = {}
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        ax = fig.axes[0]
        seen[Path(path).name] = {
            "title": ax.get_title(), "ylim": ax.get_ylim(), "xticks": list(ax.get_xticks()),
            "markers": [line.get_marker() for line in ax.get_lines() if line.get_linestyle() != "--"],
            "dashed_x": [list(line.get_xdata()) for line in ax.get_lines() if line.get_linestyle() == "--"],
            "spans": [(patch.get_x(), patch.get_x() + patch.get_width()) for patch in ax.patches],
        }
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return seen


def test_a_long_run_name_takes_its_own_title_line(tmp_path: Path, figures: dict[str, dict]) -> None:
    # A sweep cell's pipeline stage: on one line the title ran past the figure's edge (Fashion-MNIST study).
    name = "method-fitnets_strategy-abl_seed0"
    (tmp_path / name).mkdir()
    (tmp_path / name / "pipeline.yaml").write_text("seeds: 1\n")
    plot_run(write_run(tmp_path / name / "search", gamma_steps=(0, 100), strategy="abl-search"))
    assert figures["gamma_trajectories.png"]["title"] == (f"{name}/search:\n"
                                                          "ABL student weight per block (ABL Fig. 3)")
    assert figures["accuracy.png"]["title"] == f"{name}/search: accuracy"  # short enough for one line


def test_every_title_names_the_run(tmp_path: Path, figures: dict[str, dict]) -> None:
    run = write_run(tmp_path / "kd_resnet8_seed3", shares=True, gamma_steps=(0, 100, 200), warm_steps=100,
                    strategy="abl-search")
    names = {p.name for p in plot_run(run)}
    assert names == {"accuracy.png", "losses.png", "spot_shares.png", "gamma_trajectories.png"}
    assert figures["accuracy.png"]["title"] == "kd_resnet8_seed3: accuracy"
    assert figures["gamma_trajectories.png"]["title"] == "kd_resnet8_seed3: ABL student weight per block (ABL Fig. 3)"
    for name in names:
        assert figures[name]["title"].startswith("kd_resnet8_seed3: "), figures[name]["title"]


def test_share_plot_is_fixed_to_fractions(tmp_path: Path, figures: dict[str, dict]) -> None:
    plot_run(write_run(tmp_path / "sakd", shares=True))
    assert figures["spot_shares.png"]["ylim"] == (0.0, 1.02)
    assert figures["accuracy.png"]["ylim"] != (0.0, 1.02)  # only shares are fractions


@pytest.mark.parametrize("epochs", [1, 3, 7])
def test_epoch_axes_have_integer_ticks(tmp_path: Path, figures: dict[str, dict], epochs: int) -> None:
    plot_run(write_run(tmp_path / "run", epochs=epochs, shares=True))
    for name in ("accuracy.png", "losses.png", "spot_shares.png"):
        ticks = figures[name]["xticks"]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)


def test_short_series_get_markers_long_ones_do_not(tmp_path: Path, figures: dict[str, dict]) -> None:
    plot_run(write_run(tmp_path / "one_epoch", epochs=1, gamma_steps=(0,)))
    assert figures["accuracy.png"]["markers"] == ["o", "o", "o"]
    assert figures["losses.png"]["markers"] == ["o", "o"]
    assert figures["gamma_trajectories.png"]["markers"] == ["o", "o"]  # one abl_gamma.csv row: two points, visible
    plot_run(write_run(tmp_path / "long", epochs=MARKERS_BELOW, gamma_steps=tuple(range(0, 100 * MARKERS_BELOW, 100))))
    assert figures["accuracy.png"]["markers"] == ["None"] * 3
    assert figures["gamma_trajectories.png"]["markers"] == ["None"] * 2
    plot_run(write_run(tmp_path / "almost", epochs=MARKERS_BELOW - 1))
    assert figures["accuracy.png"]["markers"] == ["o"] * 3


def test_warm_band_ends_at_the_configured_warm_steps(tmp_path: Path, figures: dict[str, dict]) -> None:
    # Meta rows are logged every log_every updates: the first one (400) lies past the real end of the warm start.
    run = write_run(tmp_path / "search", gamma_steps=(0, 100, 200, 400, 500), warm_steps=250, strategy="abl-search")
    plot_run(run)
    assert figures["gamma_trajectories.png"]["dashed_x"] == [[250, 250]]
    assert figures["gamma_trajectories.png"]["spans"] == [(0.0, 250.0)]


def test_warm_band_uses_the_options_default_when_the_config_omits_it(tmp_path: Path,
                                                                      figures: dict[str, dict]) -> None:
    default = ABLOptions().warm_steps
    plot_run(write_run(tmp_path / "search", gamma_steps=(0, 100), strategy="abl-search"))
    assert figures["gamma_trajectories.png"]["dashed_x"] == [[default, default]]
    assert figures["gamma_trajectories.png"]["spans"] == [(0.0, float(default))]


def test_warm_band_follows_search_scale(tmp_path: Path, figures: dict[str, dict]) -> None:
    # The band once ended at the unscaled 40,000 steps for a search scaled to 213 (the Fashion-MNIST study).
    scaled = ABLOptions(search_scale=0.01).warm_steps
    assert scaled == round(ABLOptions().warm_steps * 0.01)
    plot_run(write_run(tmp_path / "search", gamma_steps=(0, 100, 500), strategy="abl-search",
                       args={"search_scale": 0.01}))
    assert figures["gamma_trajectories.png"]["spans"] == [(0.0, float(scaled))]


def test_warm_band_falls_back_to_the_first_meta_row_without_config(tmp_path: Path,
                                                                  figures: dict[str, dict]) -> None:
    plot_run(write_run(tmp_path / "search", gamma_steps=(0, 100, 200, 400, 500), warm_steps=250))
    assert figures["gamma_trajectories.png"]["dashed_x"] == [[400, 400]]
    plot_run(write_run(tmp_path / "standard", gamma_steps=(0, 100, 200, 400, 500), warm_steps=250,
                       strategy="standard"))
    assert figures["gamma_trajectories.png"]["dashed_x"] == [[400, 400]]  # a strategy without warm_steps


def write_pipeline(root: Path) -> Path:
    """An `adakd abl` folder: pipeline.yaml, a search stage, two final stages, one still without an epoch."""
    root.mkdir()
    (root / "pipeline.yaml").write_text(yaml.safe_dump({"seeds": 3, "config": {"seed": 0}}))
    write_run(root / "search", gamma_steps=(0, 100, 200), warm_steps=100, strategy="abl-search")
    write_run(root / "final_seed0", strategy="abl")
    write_run(root / "final_seed1", strategy="abl")
    (root / "final_seed2").mkdir()
    (root / "final_seed2" / "metrics.csv").write_text("epoch,train/loss\n")  # started, no epoch finished
    (root / "final_seed2" / "config.yaml").write_text("seed: 2\n")
    return root


def test_plot_of_a_pipeline_folder_plots_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     figures: dict[str, dict]) -> None:
    root = write_pipeline(tmp_path / "abl_resnet20")
    assert main(["plot", str(root)]) == 0
    printed = capsys.readouterr().out.split()
    expected = [root / "search" / "plots" / f for f in ("accuracy.png", "losses.png", "gamma_trajectories.png")]
    for stage in ("final_seed0", "final_seed1"):
        expected += [root / stage / "plots" / f for f in ("accuracy.png", "losses.png")]
    assert printed == [str(p) for p in expected]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in expected)
    assert not (root / "final_seed2" / "plots").exists() and not (root / "plots").exists()
    assert figures["gamma_trajectories.png"]["title"].startswith("abl_resnet20/search: ")

    out = tmp_path / "figures"
    assert main(["plot", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / p.parent.parent.name / p.name) for p in expected]
    assert sorted(p.name for p in out.iterdir()) == ["final_seed0", "final_seed1", "search"]


def test_plot_of_a_pipeline_folder_refuses_compare(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_pipeline(tmp_path / "abl")
    assert main(["plot", str(root), "--compare", str(root / "final_seed0")]) == 2
    assert "--compare takes one run" in capsys.readouterr().err
    assert not (root / "search" / "plots").exists()
