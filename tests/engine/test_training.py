"""End-to-end engine behaviour on the embedded digits: learning, exact resume, frozen teacher, run dirs."""
from __future__ import annotations

import csv
import json

import pytest
import yaml
import torch

from adakd import models
from adakd.cli import main
from adakd.engine import checkpoint as run_checkpoint
from adakd.engine.config import resolve
from adakd.engine.runs import RunDirError
from adakd.engine.trainer import Trainer
from tiny_run import TINY_RUN, save_random_teacher

FAST = [*TINY_RUN, "data.train_size=192", "deterministic=true"]


def config(tmp_path, *overrides, name="run"):
    return resolve(["cifar100", "demo"], overrides=[f"out_dir={tmp_path}", f"name={name}", *FAST, *overrides])


def teacher_file(tmp_path, name="resnet14"):
    return save_random_teacher(tmp_path / f"{name}_teacher.pth", name, epoch=240)


def test_training_on_digits_learns(tmp_path):
    cfg = resolve(["cifar100", "demo"], overrides=[f"out_dir={tmp_path}", "name=learn", "data.image_size=16",
                                                   "model.name=resnet8", "optim.epochs=3", "log.progress=false",
                                                   "data.train_size=null"])
    summary = Trainer(cfg).fit()
    rows = list(csv.DictReader(open(tmp_path / "learn" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows]
    assert len(rows) == 3 and losses[-1] < 0.6 * losses[0]
    assert summary["last_acc1"] > 60.0  # 10 classes: chance is 10 %
    assert float(rows[-1]["test/acc1"]) > float(rows[0]["test/acc1"])
    saved = resolve(files=[tmp_path / "learn" / "config.yaml"])
    assert saved == cfg  # the resolved config round-trips from the run directory
    meta = json.loads((tmp_path / "learn" / "meta.json").read_text())
    assert meta["seed"] == 0 and "adakd_version" in meta and "torch_version" in meta
    assert summary["best_epoch"] >= 1 and (tmp_path / "learn" / "best.pth").is_file()
    assert any((tmp_path / "learn" / "tensorboard").iterdir())


def _all_state(trainer):
    state = dict(trainer.student.model.state_dict())
    state.update({f"distiller.{k}": v for k, v in trainer.strategy.state_dict()["distiller"].items()})
    for name, opt in trainer.optimizers.items():
        for i, buf in enumerate(opt.state_dict()["state"].values()):
            state[f"{name}.momentum{i}"] = buf["momentum_buffer"]
    return state


@pytest.mark.parametrize("task, method", [("train", None), ("distill", "kd"), ("distill", "crd"),
                                          ("distill", "vid")])
def test_resume_equals_uninterrupted(tmp_path, task, method):
    extra = ["model.name=resnet8", "optim.milestones=[1]"]
    if task == "distill":
        extra += ["task=distill", "teacher.name=resnet14", f"teacher.weights={teacher_file(tmp_path)}",
                  "distill.kl_weight=0.5", f"method={method}", "distill.args={}" if method != "crd"
                  else "distill.args.num_negatives=32"]
    straight = Trainer(config(tmp_path, "optim.epochs=2", *extra, name="straight"))
    straight.fit()
    first = Trainer(config(tmp_path, "optim.epochs=1", *extra, name="split"))
    first.fit()
    resumed = Trainer.resume(tmp_path / "split", ["optim.epochs=2"])
    assert resumed.epoch == 1
    resumed.fit()
    a, b = _all_state(straight), _all_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[1]["lr"] == str(0.05 * 0.1)  # the schedule continued: epoch 2 exceeds milestone 1
    # The run folder's config says what the run now is; the first one is kept beside it.
    assert yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())["optim"]["epochs"] == 2
    assert yaml.safe_load((tmp_path / "split" / "config.before-resume.yaml").read_text())["optim"]["epochs"] == 1
    assert "config.yaml rewritten" in (tmp_path / "split" / "log.txt").read_text()


def test_teacher_is_frozen_and_stays_in_eval(tmp_path):
    trainer = Trainer(config(tmp_path, "task=distill", "model.name=resnet8", "teacher.name=resnet14",
                             f"teacher.weights={teacher_file(tmp_path)}", "optim.epochs=1"))
    teacher = trainer.strategy.teacher
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    trainer.strategy.train(True)
    teacher.train(True)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    trainer.fit()
    after = teacher.model.state_dict()
    for key in before:  # running statistics included: the teacher's BN never updated
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in teacher.parameters())
    columns = next(csv.reader(open(tmp_path / "run" / "metrics.csv")))
    assert "train/kd/logits" in columns and "train/ce" in columns


def test_random_teacher_is_refused(tmp_path):
    with pytest.raises(Exception, match="teacher.weights is required"):
        Trainer(config(tmp_path, "task=distill", "teacher.name=resnet14"))


def test_existing_run_dir_is_never_overwritten(tmp_path):
    Trainer(config(tmp_path, "optim.epochs=1", "model.name=resnet8")).fit()
    before = (tmp_path / "run" / "last.pth").read_bytes()
    with pytest.raises(RunDirError, match="already exists.*--resume"):
        Trainer(config(tmp_path, "optim.epochs=1", "model.name=resnet8"))
    assert (tmp_path / "run" / "last.pth").read_bytes() == before


def test_checkpoint_contents_and_safe_load(tmp_path):
    Trainer(config(tmp_path, "optim.epochs=1", "model.name=resnet8")).fit()
    state = torch.load(tmp_path / "run" / "last.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizers", "schedule", "rng", "epoch", "step", "config", "strategy"} <= set(state)
    assert state["epoch"] == 1 and state["step"] == 6  # 192 samples / batch 32
    fresh = models.create("resnet8", num_classes=10)
    models.load_weights(fresh, tmp_path / "run" / "last.pth")  # a run checkpoint is a CRD-style file


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.pth"
    run_checkpoint.save_atomic({"v": torch.ones(3)}, target)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        run_checkpoint.save_atomic({"v": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


@pytest.mark.parametrize("argv, fragment", [
    (["train", "optim.lrr=0.1"], "unknown config key optim.lrr; did you mean optim.lr?"),
    (["train", "model.name=resnet21"], "'resnet20'"),
    (["distill", "method=kdd", "teacher.name=resnet8", "teacher.weights=/nonexistent.pth"], ""),
    (["train", "data.name=cifar100", "data.root=/nonexistent", "data.download=false"], "cifar-100-python"),
    (["eval", "/nonexistent.pth", "model.name=resnet8", "data.name=digits"], "does not exist"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, fragment):
    code = main([*argv, f"out_dir={tmp_path}"] if argv[0] != "eval" else argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("adakd: error: ") and fragment in err
    assert "Traceback" not in err


def test_cli_models_lists_every_model(capsys):
    assert main(["models", "resnet8*"]) == 0
    out = capsys.readouterr().out
    assert "resnet8 " in out and "83,892" in out and "resnet8x4" in out and "64x8x8" in out


def test_cli_eval_of_a_run(tmp_path, capsys):
    Trainer(config(tmp_path, "optim.epochs=1", "model.name=resnet8")).fit()
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert "top-1" in capsys.readouterr().out


def test_channels_last_gives_the_same_training_on_cpu(tmp_path):
    # Two steps: the kernels of the two layouts round differently, and six steps of SGD at lr 0.05 grow that
    # float32 rounding past 1e-4 on one thread (a layout bug moves weights by far more after one step).
    short = ["optim.epochs=1", "model.name=resnet8", "data.train_size=64"]
    plain = Trainer(config(tmp_path, *short, name="plain"))
    plain.fit()
    nhwc = Trainer(config(tmp_path, *short, "channels_last=true", name="nhwc"))
    assert nhwc.student.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc.fit()
    for key, value in plain.student.model.state_dict().items():
        other = nhwc.student.model.state_dict()[key]
        assert torch.allclose(value.float(), other.float(), atol=1e-4), key


def test_amp_is_a_no_op_on_cpu():
    from adakd.strategies.base import Precision

    precision = Precision(torch.device("cpu"), enabled=True)
    assert not precision.enabled and not precision.scaler.is_enabled()
    with precision.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_cli_plot_writes_figures(tmp_path, capsys):
    Trainer(config(tmp_path, "optim.epochs=2", "model.name=resnet8")).fit()
    assert main(["plot", str(tmp_path / "run")]) == 0
    paths = capsys.readouterr().out.split()
    assert {p.rsplit("/", 1)[-1] for p in paths} == {"accuracy.png", "losses.png"}
    assert all((tmp_path / "run" / "plots" / name).stat().st_size > 1000 for name in ("accuracy.png", "losses.png"))
    assert main(["plot", str(tmp_path / "missing")]) == 2
