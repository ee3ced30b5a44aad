"""Sweeps end to end on digits: a 2x2x2 grid completes, re-runs skip, a killed sweep resumes to the same table,
changed configs and bad grids are refused, the submitit path runs, and the table's statistics are right."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adakd.cli import main
from adakd.experiments.launch import run_sweep
from adakd.experiments.sweep import Sweep, SweepError, grid_names, load_grid, plan
from adakd.experiments.sweep_report import format_table

GRID = {
    "description": "test grid",
    "presets": ["cifar100", "demo"],
    "overrides": {"epochs": 2, "data.image_size": 8, "data.train_size": 96, "log.tensorboard": False,
                  "model.name": "resnet8", "teacher.name": "resnet8"},
    "axes": {"method": ["kd", "at"], "strategy": ["standard", "sakd"]},
    "seeds": 2,
    "baselines": ["student"],
}


def write_grid(folder: Path, grid: dict | None = None, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(grid or GRID, sort_keys=False))
    return path


def table_body(text: str) -> str:
    """The table without its first line (which names the folder)."""
    return "\n".join(text.splitlines()[1:])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The 2x2x2 grid run to the end once, 2 cells at a time."""
    folder = tmp_path_factory.mktemp("sweep")
    grid = write_grid(folder)
    out = folder / "out"
    failed, root = run_sweep(str(grid), [], out=out, jobs=2, progress=False)
    return grid, root, failed


@pytest.mark.slow
def test_grid_completes_with_teacher_trained_first(finished):
    grid, root, failed = finished
    assert failed == {}
    cells = Sweep(root).cells()
    names = [c.name for c in cells]
    # One teacher (seed 0), a student baseline per seed, and the 2x2 product per seed.
    assert names[:3] == ["teacher-resnet8_seed0", "student-resnet8_seed0", "student-resnet8_seed1"]
    assert len(cells) == 3 + 8
    for cell in cells:
        summary = json.loads((root / "cells" / cell.name / "summary.json").read_text())
        assert summary["epochs"] == 2
    distill = [c for c in cells if c.role == "cell"]
    assert all(c.after == ["teacher-resnet8_seed0"] for c in distill)
    saved = yaml.safe_load((root / "cells" / distill[0].name / "config.yaml").read_text())
    assert saved["teacher"]["weights"] == str(root / "cells" / "teacher-resnet8_seed0" / "last.pth")
    assert saved["threads"] == 1  # 2 cores shared by 2 cells at once


@pytest.mark.slow
def test_table_has_mean_std_and_paired_delta(finished):
    _, root, _ = finished
    sweep = Sweep(root)
    cells = {c.name: c for c in sweep.cells()}
    text = format_table(root)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"teacher", "student", "kd", "at"}
    # The at row: 'standard mean ± std / sakd mean ± std (+Δ ± sd)', Δ paired by seed, computed here by hand.
    values = {(s, seed): sweep.result(cells[f"method-at_strategy-{s}_seed{seed}"])["last_acc1"]
              for s in ("standard", "sakd") for seed in (0, 1)}
    standard = [values["standard", 0], values["standard", 1]]
    adaptive = [values["sakd", 0], values["sakd", 1]]
    deltas = [a - b for a, b in zip(adaptive, standard)]
    expected = (f"{statistics.mean(standard):.2f} ± {statistics.stdev(standard):.2f} / "
                f"{statistics.mean(adaptive):.2f} ± {statistics.stdev(adaptive):.2f} "
                f"({'+' if statistics.mean(deltas) >= 0 else ''}{statistics.mean(deltas):.2f} ± "
                f"{statistics.stdev(deltas):.2f})")
    assert expected in rows["at"]
    csv_text = format_table(root, fmt="csv")
    import csv  # the tidy CSV read back (tests/experiments/test_table_formats.py checks every column by hand)

    records = {(r["row"], r["compare"]): r for r in csv.DictReader(csv_text.splitlines())}
    assert float(records["at", "sakd"]["delta_mean"]) == pytest.approx(statistics.mean(deltas), abs=1e-9)
    latex = format_table(root, fmt="latex")
    assert latex.startswith("% sweep ") and r"\begin{tabular}" in latex and r"$\pm$" in latex


@pytest.mark.slow
def test_rerun_skips_every_cell(finished, capsys):
    grid, root, _ = finished
    logs = {p.name: p.stat().st_mtime_ns for p in (root / "logs").iterdir()}
    before = format_table(root)
    started = time.perf_counter()
    failed, _ = run_sweep(str(grid), [], out=root, jobs=2, progress=False)
    assert failed == {} and time.perf_counter() - started < 30  # no cell trained again
    assert {p.name: p.stat().st_mtime_ns for p in (root / "logs").iterdir()} == logs
    assert format_table(root) == before
    # Continuing from the folder alone takes the saved grid.
    assert main(["sweep", str(root)]) == 0
    assert "11/11 cells done" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_results(finished, tmp_path):
    _, root, _ = finished
    # A part of the grid: its cells have the same names and configs as those of the finished sweep.
    grid = write_grid(tmp_path, {**GRID, "axes": {"method": ["kd"], "strategy": ["standard", "sakd"]}, "seeds": 1})
    # Kill the sweep and every cell it runs (the whole process group, like a lost machine) once some cell is done
    # and a distill cell has checkpointed an epoch. On an idle machine these tiny cells can finish between two looks,
    # so the group is frozen (SIGSTOP) the moment that is seen, and a sweep that still got to the end is run again.
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        process = subprocess.Popen([sys.executable, "-m", "adakd", "sweep", str(grid), "--out", str(out), "--jobs",
                                    "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            states = [json.loads(p.read_text())["state"] for p in (out / "state").glob("*.json")] \
                if (out / "state").is_dir() else []
            if "done" in states and any((out / "cells").glob("method-*/last.pth")):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGSTOP)
                break
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        sweep = Sweep(out)
        states = [sweep.state(c)["state"] for c in sweep.cells()]
        if "done" in states and set(states) != {"done"}:
            break
    else:
        pytest.fail(f"the sweep ended before it could be killed mid-run, three times (states {states})")
    failed, _ = run_sweep(str(grid), [], out=out, jobs=2, progress=False)
    assert failed == {}
    reference = Sweep(root)
    for cell in sweep.cells():
        ours, theirs = sweep.result(cell), reference.result(cell)
        assert (ours["last_acc1"], ours["best_acc1"], ours["best_epoch"]) == \
            (theirs["last_acc1"], theirs["best_acc1"], theirs["best_epoch"]), cell.name


def test_changed_cell_config_is_refused(tmp_path):
    grid = write_grid(tmp_path)
    out = tmp_path / "out"
    label, source = load_grid(grid)
    cells = plan(source, label, out)
    sweep = Sweep(out)
    sweep.write_plan(label, source, [], {}, cells)
    (out / "cells" / cells[-1].name).mkdir(parents=True)  # started
    with pytest.raises(SweepError, match=r"cell method-at_strategy-sakd_seed1 was started with another config "
                                         r"\(optim\.epochs: 2 -> 3"):
        sweep.check_unchanged(plan(source, label, out, ["epochs=3"]))
    # A planned cell that never started may change.
    sweep.check_unchanged(plan(source, label, out, ["epochs=2"]))


@pytest.mark.slow  # a real sweep, run three times
def test_failed_cell_is_listed_not_retried_unless_asked(tmp_path, capsys):
    grid = {**GRID, "axes": {"method": ["kd"], "strategy": ["standard"]}, "seeds": 1, "baselines": [],
            # Valid as a config, refused when the run builds its distiller: the cell fails at run time.
            "rules": [{"match": {"method": "kd"}, "overrides": {"distill.args.no_such_option": 1}}]}
    path = write_grid(tmp_path, grid)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "1 cell(s) failed" in text and "method-kd_strategy-standard_seed0" in text
    assert "no_such_option" in text and str(out / "logs" / "method-kd_strategy-standard_seed0.log") in text
    assert (out / "cells" / "teacher-resnet8_seed0" / "summary.json").is_file()
    log = out / "logs" / "method-kd_strategy-standard_seed0.log"
    size = log.stat().st_size
    assert main(["sweep", str(out)]) == 1  # listed again, not run
    assert log.stat().st_size == size
    assert main(["sweep", str(out), "--retry-failed"]) == 1  # run again (and fails again)
    assert log.stat().st_size > size


@pytest.mark.slow
def test_submitit_local_executor_runs_a_grid(tmp_path):
    pytest.importorskip("submitit")
    grid = {**GRID, "axes": {"method": ["kd"], "strategy": ["standard", "sakd"]}, "seeds": 1, "baselines": []}
    path = write_grid(tmp_path, grid)
    out = tmp_path / "out"
    failed, root = run_sweep(str(path), ["threads=1"], out=out, jobs=2, launcher="slurm",
                             slurm={"cluster": "local", "timeout_min": 10}, progress=False)
    assert failed == {}
    sweep = Sweep(root)
    assert all(sweep.state(c)["state"] == "done" for c in sweep.cells())
    assert any((root / "slurm").rglob("*_log.out"))  # submitit's own job logs


@pytest.mark.slow  # plans every shipped grid (35 s on 2 cores)
def test_every_shipped_grid_validates_and_carries_its_paper_numbers(capsys):
    assert {"demo", "fmnist-study", "sakd-table3", "sakd-table4", "sakd-table5", "sakd-table6", "sakd-table7",
            "sakd-table8", "abl-table8", "crd-same", "crd-cross", "dkd", "dkd-imagenet"} <= set(grid_names())
    for name in grid_names():
        label, source = load_grid(name)
        cells = plan(source, label, Path("/nonexistent") / name, check_teachers=False)
        grid_cells = [c for c in cells if c.role == "cell"]
        assert grid_cells, name
        if name in ("demo", "fmnist-study", "adaptive-logit"):  # ours: no published numbers
            assert "paper" not in source
            continue
        table = source["table"]
        rows = {c.coords[table["rows"]] for c in grid_cells}
        columns = {c.coords[table["columns"]] for c in grid_cells}
        compared = {c.coords[table["compare"]] for c in grid_cells} if table.get("compare") else set()
        paper = source["paper"]
        assert paper["metric"] in ("last", "best", "not stated") and paper["source"]
        numbers = 0
        for row, by_column in paper["values"].items():
            assert row in rows | {"teacher", "student"}, (name, row)
            for column, value in by_column.items():
                assert column in columns, (name, row, column)
                if isinstance(value, dict):
                    assert set(value) <= compared, (name, row, column)
                    numbers += len(value)
                else:
                    numbers += 1
        assert numbers >= len(columns), name
    assert main(["sweep", "sakd-table3", "--dry-run", "--out", "/nonexistent/x"]) == 0
    out = capsys.readouterr().out
    assert "nothing was run (--dry-run)" in out and not Path("/nonexistent/x").exists()


def test_table_statistics_and_published_numbers_by_hand(tmp_path):
    """A sweep folder written by hand: mean ± std, paired Δ and ours − published against hand arithmetic."""
    grid = {"presets": ["cifar100", "demo"], "overrides": {"model.name": "resnet8", "teacher.name": "resnet8",
                                                          "teacher.weights": "t.pth"},
            "axes": {"pair": ["resnet56-resnet20"], "method": ["at"], "strategy": ["standard", "sakd"]},
            "seeds": 3, "table": {"rows": "method", "columns": "pair", "compare": "strategy"},
            "paper": {"source": "a paper", "metric": "last", "runs": "mean of 3",
                      "values": {"at": {"resnet56-resnet20": {"standard": 70.0, "sakd": 71.0}}}}}
    label, source = "hand", grid
    out = tmp_path / "sweep"
    cells = plan(source, label, out)
    sweep = Sweep(out)
    sweep.write_plan(label, source, [], {}, cells)
    accuracy = {("standard", 0): 70.0, ("standard", 1): 71.0, ("standard", 2): 72.5,
                ("sakd", 0): 71.0, ("sakd", 1): 71.5, ("sakd", 2): 74.0}
    for (strategy, seed), value in accuracy.items():
        if (strategy, seed) == ("sakd", 2):
            continue  # still running: n = 2 of 3, and the Δ pairs only seeds 0 and 1
        folder = out / "cells" / f"pair-resnet56-resnet20_method-at_strategy-{strategy}_seed{seed}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"last_acc1": value, "best_acc1": value + 1,
                                                         "teacher_acc1": 75.0}))
    text = format_table(out)
    # standard: 70, 71, 72.5 -> 71.17 ± 1.26; sakd: 71, 71.5 -> 71.25 ± 0.35 (n=2/3); Δ: 1.0, 0.5 -> 0.75 ± 0.35
    assert "| at | 71.17 ± 1.26 / 71.25 ± 0.35 (n=2/3) (+0.75 ± 0.35 (n=2/3)) |" in text
    assert "| teacher | 75.00 |" in text
    assert "| at | 70.00 / 71.00 |" in text  # published
    assert "| at | +1.17 / +0.25 |" in text  # ours − published
    best = format_table(out, metric="best")
    assert "72.17 ± 1.26" in best and "ours above: best epoch" in best


def test_bad_grids_give_one_line(tmp_path, capsys):
    cases = [
        (["sweep", "sakd-tabel3"], "unknown grid 'sakd-tabel3'"),
        (["sweep", str(write_grid(tmp_path, {**GRID, "axis": {}}, "typo.yaml"))], "unknown key 'axis'; did you mean axes?"),
        (["sweep", str(write_grid(tmp_path, {**GRID, "include": [{"method": "kd"}]}, "inc.yaml"))],
         "must give every axis"),
        (["sweep", str(write_grid(tmp_path, GRID, "g.yaml")), "method=kd"], "method is an axis of grid g"),
        (["sweep", str(write_grid(tmp_path, {**GRID, "axes": {"method": ["kd", "atx"]}}, "m.yaml"))],
         "cell method-atx_seed0"),
        (["sweep", "sakd-table6", "--out", str(tmp_path / "t6")], "teacher resnet34 must be given"),
        (["table", str(tmp_path)], "is not a sweep folder"),
        (["sweep", str(write_grid(tmp_path, {**GRID, "seeds": 0}, "s.yaml"))], "seeds must be >= 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("adakd: error:") and message in err[0], (argv, err)


def test_slurm_launcher_without_submitit_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import adakd.experiments.slurm as slurm

    monkeypatch.setattr(slurm, "submitit", None)
    grid = write_grid(tmp_path, {**GRID, "axes": {"method": ["kd"], "strategy": ["standard"]}, "seeds": 1,
                                 "baselines": []})
    assert main(["sweep", str(grid), "--out", str(tmp_path / "out"), "--launcher", "slurm"]) == 2
    assert capsys.readouterr().err.strip() == 'adakd: error: --launcher slurm needs submitit: pip install "adakd[slurm]"'
    assert not (tmp_path / "out").exists()  # nothing written: the sweep folder is made after the check


@pytest.mark.slow
def test_plot_draws_the_delta_and_compare_puts_runs_side_by_side(finished, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, root, _ = finished
    assert main(["plot", str(root), "--out", str(tmp_path / "plots")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "plots" / "delta.png")
    assert (tmp_path / "plots" / "delta.png").stat().st_size > 1000
    runs = [root / "cells" / f"method-kd_strategy-{s}_seed0" for s in ("standard", "sakd")]
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "compare.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "epochs", "last", "best", "(epoch)"]
    for run, line in zip(runs, lines[1:3]):
        summary = json.loads((run / "summary.json").read_text())
        assert line.split()[1:3] == ["2", f"{summary['last_acc1']:.2f}"]
    assert (tmp_path / "compare.png").stat().st_size > 1000
