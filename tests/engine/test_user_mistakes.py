"""Mistakes a new user makes that used to be accepted silently, and the CLI habits users bring from other tools.

Each test runs `adakd.cli.main` in-process on the embedded digits (nothing downloads).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_bad_input import FAST, distill_argv, fails, run_argv, snapshot

from adakd.cli import main
from adakd.engine.config import resolve
from adakd.engine.optim import lr_at
from adakd.engine.trainer import Trainer
from tiny_run import save_random_teacher


@pytest.mark.parametrize("extra, named", [
    (["teacher.name=resnet8", "teacher.weights=t.pth"], "teacher.weights=t.pth"),
    (["method=crd"], "method=crd"),
    (["strategy=sakd"], "strategy=sakd"),
    (["--preset", "sakd"], "strategy=sakd, distill.kl_weight=1.0"),
    (["components.dot=true"], "components={'dot': True}"),  # an adaptive component changes a distillation step
])
def test_train_refuses_distillation_settings_it_would_ignore(tmp_path, capsys, extra, named):
    line = fails(capsys, run_argv(tmp_path, *extra), named, "adakd distill")
    assert "alone with cross-entropy" in line
    assert not (tmp_path / "runs").exists()


def test_a_pair_preset_may_train_its_student_alone(tmp_path):
    # The pair preset names a teacher; training the student alone under it is the baseline, not a mistake.
    config = resolve(["cifar100", "pair-resnet56-resnet20"], None, ["task=train"])
    assert config.teacher.name == "resnet56" and config.model.name == "resnet20"


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_a_root_for_a_dataset_that_reads_no_folder_is_an_error(tmp_path, capsys, dataset):
    fails(capsys, run_argv(tmp_path, f"dataset={dataset}", "data.root=/nowhere"), "/nowhere", "Remove data.root")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("presets, overrides, milestones", [
    (["cifar100"], ["epochs=5"], (3, 4, 4)),  # 150, 180, 210 of 240, rounded; every decay kept
    (["cifar100"], ["epochs=24"], (15, 18, 21)),
    (["cifar100", "demo"], ["epochs=3"], (2, 3)),  # the demo's own 20, 27 of 30
    (["cifar100"], ["epochs=5", "optim.milestones=[2]"], (2,)),  # given: kept as given
    (["cifar100"], ["optim.milestones=[10]", "epochs=20"], (10,)),  # the command line is one layer: both given
    (["cifar100"], [], (150, 180, 210)),
    ([], ["epochs=12"], (8, 9, 11)),  # the dataclass defaults are the same 240-epoch recipe
])
def test_milestones_scale_with_the_epochs_unless_given(presets, overrides, milestones):
    config = resolve(presets, None, overrides)
    assert config.optim.milestones == milestones
    if milestones == (3, 4, 4):  # the lr decays: 0.05 for 3 epochs, 0.005 for the 4th, 5e-5 for the 5th
        assert [lr_at(config.optim, e, 0.05) for e in range(1, 6)] == pytest.approx([0.05] * 3 + [5e-3, 5e-5])


def test_a_run_prints_and_logs_its_schedule_epoch_times_and_eta(tmp_path, capsys):
    argv = ["train", "--preset", "demo", "data.image_size=8", "data.train_size=64", "log.tensorboard=false",
            "model.name=resnet8", f"out_dir={tmp_path}", "name=r", "epochs=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # The demo's milestones 20, 27 of 30 epochs become 2, 3 of 3.
    assert "lr schedule over 3 epochs: 0.05 (epochs 1-2), 0.005 (epoch 3)" in out
    assert "run ETA 0:00:00" in out and "epoch 3/3" in out
    log = (tmp_path / "r" / "log.txt").read_text()
    for text in ("lr schedule over 3 epochs", "epoch 1/3", "epoch 3/3", "run ETA", "done: last epoch (3)"):
        assert text in log
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert len(rows) == 3 and all(float(r["time/epoch_s"]) > 0 for r in rows)
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    # From a git checkout (editable or built there) the commit is recorded; it is a 40-digit hash when present.
    if "git" in meta:
        assert len(meta["git"]["commit"]) == 40 and isinstance(meta["git"]["dirty"], bool)


def test_git_commit_is_recorded_from_an_editable_checkout(monkeypatch, tmp_path):
    import adakd
    from adakd.engine import runs

    package = Path(adakd.__file__).resolve().parent
    if not (package.parent.parent / ".git").exists():
        pytest.skip("adakd is installed, not imported from its checkout")
    commit = runs.source_commit()
    assert commit is not None and len(commit["commit"]) == 40
    # A built wheel's record is the fallback outside a checkout.
    monkeypatch.setattr(runs.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    record = package / "_source_commit.json"
    if not record.exists():
        assert runs.source_commit() is None


def teacher_file(tmp_path: Path, trained: bool) -> Path:
    """A resnet8 on the 8-pixel digits: random, or trained 4 epochs (about 70 % top-1)."""
    if not trained:
        return save_random_teacher(tmp_path / "random.pth", seed=5)
    argv = ["train", *FAST, "data.train_size=null", "optim.epochs=4", f"out_dir={tmp_path}", "name=teacher"]
    assert main(argv) == 0
    return tmp_path / "teacher" / "last.pth"


def test_the_teacher_is_scored_once_and_a_teacher_near_chance_is_flagged(tmp_path, capsys):
    weak = teacher_file(tmp_path, trained=False)
    assert main(distill_argv(tmp_path, teacher_weights=weak, name="weak")) == 0
    err = capsys.readouterr().err
    assert "adakd: warning: the teacher scores" in err and "near chance (10.00%)" in err
    assert "data.image_size" in err  # the usual cause: a teacher trained at another size
    scored = json.loads((tmp_path / "runs" / "weak" / "teacher.json").read_text())
    summary = json.loads((tmp_path / "runs" / "weak" / "summary.json").read_text())
    assert scored["acc1"] < 20.0 and summary["teacher_acc1"] == scored["acc1"]
    assert "adakd: warning" in (tmp_path / "runs" / "weak" / "log.txt").read_text()

    good = teacher_file(tmp_path, trained=True)
    capsys.readouterr()
    assert main(distill_argv(tmp_path, "log.progress=true", teacher_weights=good, name="good")) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    scored = json.loads((tmp_path / "runs" / "good" / "teacher.json").read_text())
    assert scored["acc1"] > 40.0 and f"top-1 {scored['acc1']:.2f}%" in captured.out
    # The same weights scored by `adakd eval` agree with the number the run printed.
    assert main(["eval", str(good), "model.name=resnet8", "--preset", "demo", "data.image_size=8"]) == 0
    assert f"top-1 {scored['acc1']:.2f}%" in capsys.readouterr().out


def test_overrides_may_follow_options(tmp_path, capsys):
    argv = ["train", "--preset", "demo", "data.image_size=8", "data.train_size=64", "log.progress=false",
            "log.tensorboard=false", "model.name=resnet8", f"out_dir={tmp_path}", "--print-config", "epochs=2",
            "--preset", "sakd", "strategy=standard", "distill.kl_weight=0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "epochs: 2" in printed and "name: standard" in printed  # later overrides win, in the order given
    argv = ["abl", "--preset", "demo", "--seeds", "2", "name=x", "--print-config", "teacher.name=resnet8"]
    assert main(argv) == 0
    assert "name: x" in capsys.readouterr().out


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "demo", "--epochs", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --epochs; config values are set as KEY=VALUE" in capsys.readouterr().err


def test_presets_name_shows_the_preset(capsys):
    assert main(["presets", "pair-resnet56-resnet20"]) == 0
    out = capsys.readouterr().out
    assert "teacher:\n  name: resnet56" in out and "batch_size: 64" in out  # its base, cifar100, merged in
    fails(capsys, ["presets", "dem"], "unknown preset 'dem'", "demo")


@pytest.mark.parametrize("key, value, suggestion", [
    ("method", "KD", "'kd'"), ("model.name", "ResNet8", "'resnet8'"), ("strategy", "SAKD", "'sakd'"),
    ("dataset", "Digits", "digits"),
])
def test_names_are_suggested_whatever_their_case(tmp_path, capsys, key, value, suggestion):
    argv = distill_argv(tmp_path, f"{key}={value}") if key != "model.name" else run_argv(tmp_path, f"{key}={value}")
    fails(capsys, argv, repr(value) if key != "dataset" else value, suggestion)


def test_resume_with_a_preset_exits_2_with_one_line(tmp_path, capsys):
    assert main(run_argv(tmp_path)) == 0
    run = tmp_path / "runs" / "run"
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run), "--preset", "demo"], "--resume takes the run's saved config")
    fails(capsys, ["abl", "--resume", str(run), "epochs=3"], "adakd abl --resume ROOT")
    assert snapshot(run) == before


def test_ctrl_c_prints_one_line_saying_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    assert main(run_argv(tmp_path)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adakd: interrupted.")
    assert f"adakd train --resume {tmp_path / 'runs' / 'run'}" in err[0]



def test_pretrained_zoo_model_and_unknown_external_names(tmp_path, capsys):
    pytest.importorskip("timm")
    fails(capsys, run_argv(tmp_path, "model.pretrained=true"),
          "model.pretrained=true", "zoo model", "adakd teachers fetch", "model.weights=PATH")
    fails(capsys, run_argv(tmp_path, "model.name=timm:resnet10"), "unknown timm model 'resnet10'", "timm:resnet10t")
    fails(capsys, run_argv(tmp_path, "model.name=tim:resnet18"), "unknown model source 'tim'")
    fails(capsys, run_argv(tmp_path, "data.in_memory=true"), "data.in_memory applies to folder datasets, not digits")
    assert not (tmp_path / "runs").exists()
