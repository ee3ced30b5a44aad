"""ABL through the engine on the embedded digits: held-out split, both stages, the pipeline, exact resume."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from adakd.cli import main
from adakd.experiments.pipeline import run_pipeline
from adakd.engine.config import resolve
from adakd.engine.trainer import Trainer
from tiny_run import save_random_teacher

FAST = ["data.image_size=16", "data.train_size=192", "data.batch_size=32", "log.progress=false",
        "log.tensorboard=false", "deterministic=true", "task=distill", "model.name=resnet8",
        "teacher.name=resnet8"]


def teacher_file(tmp_path):
    path = tmp_path / "teacher.pth"
    if not path.exists():
        save_random_teacher(path, seed=123)
    return path


def config(tmp_path, *overrides, name="run"):
    return resolve(["cifar100", "demo"], overrides=[f"out_dir={tmp_path}", f"name={name}", *FAST,
                                                    f"teacher.weights={teacher_file(tmp_path)}", *overrides])


def rows_of(path):
    return list(csv.DictReader(open(path)))


def test_search_holds_out_a_stratified_half_and_logs_gamma(tmp_path):
    trainer = Trainer(config(tmp_path, "strategy=abl-search", "strategy.args.warm_steps=3",
                             "strategy.args.meta_steps=6", "strategy.args.log_every=2"))
    # 192 images -> about 96 trained on (per-class rounding) in 3 batches of 32 per epoch; 9 steps need 3 epochs.
    assert abs(len(trainer.train_set) - 96) <= 5 and trainer.epochs == 3
    assert len(trainer.train_set) + len(trainer.val_set) == 192
    summary = trainer.fit()
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    train, held = set(split["train"]), set(split["held_out"])
    assert not train & held and sorted(train | held) == list(range(192))
    held_counts = torch.bincount(trainer.val_set.targets, minlength=10)
    train_counts = torch.bincount(trainer.train_set.targets, minlength=10)
    assert (held_counts - train_counts).abs().max() <= 1  # stratified: each class split in half
    gamma_rows = rows_of(run / "abl_gamma.csv")
    assert [r["phase"] for r in gamma_rows] == ["warm", "warm", "meta", "meta", "meta"]
    assert [int(r["meta_step"]) for r in gamma_rows[2:]] == [2, 4, 6]
    gamma = json.loads((run / "gamma.json").read_text())
    assert gamma["meta_steps"] == 6 and any(abs(g[0]) > 0 for g in gamma["gamma"])
    metrics = rows_of(run / "metrics.csv")
    assert {"test/block_acc/block1", "test/block_acc/block2", "train/abl/p1/block1"} <= set(metrics[-1])
    assert summary["epochs"] == 3


def _state(trainer):
    state = {f"student.{k}": v for k, v in trainer.student.model.state_dict().items()}
    strategy = trainer.strategy.state_dict()
    state.update({f"heads.{k}": v for k, v in strategy["heads"].items()})
    state["gamma"] = strategy["gamma"]
    for i, entry in strategy["meta_optimizer"]["state"].items():
        state[f"adam{i}.exp_avg"] = entry["exp_avg"]
        state[f"adam{i}.exp_avg_sq"] = entry["exp_avg_sq"]
    for i, buf in enumerate(trainer.optimizers["main"].state_dict()["state"].values()):
        state[f"momentum{i}"] = buf["momentum_buffer"]
    return state


def test_search_resume_equals_uninterrupted(tmp_path):
    common = ["strategy=abl-search", "strategy.args.warm_steps=2", "strategy.args.log_every=1", "method=at"]
    straight = Trainer(config(tmp_path, *common, "strategy.args.meta_steps=4", name="straight"))
    straight.fit()
    # Epoch 1 is 3 steps: 2 warm + 1 meta. Stop there, then resume with the full budget.
    first = Trainer(config(tmp_path, *common, "strategy.args.meta_steps=1", name="split"))
    first.fit()
    assert first.epoch == 1
    resumed = Trainer.resume(tmp_path / "split", ["strategy.args.meta_steps=4"])
    assert resumed.strategy.meta_done == 1 and resumed.epochs == 2
    resumed.fit()
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert rows_of(tmp_path / "straight" / "abl_gamma.csv") == rows_of(tmp_path / "split" / "abl_gamma.csv")


def test_stage_two_uses_the_searched_p(tmp_path):
    Trainer(config(tmp_path, "strategy=abl-search", "strategy.args.warm_steps=0", "strategy.args.meta_steps=3",
                   "strategy.args.meta_lr=0.5", name="search")).fit()
    searched = json.loads((tmp_path / "search" / "gamma.json").read_text())
    final = Trainer(config(tmp_path, "strategy=abl", f"strategy.args.gamma_from={tmp_path / 'search'}",
                           "optim.epochs=1", name="final"))
    assert len(final.train_set) == 192  # stage 2 trains on the whole training set
    final.fit()
    row = rows_of(tmp_path / "final" / "metrics.csv")[-1]
    for l, p1 in enumerate(searched["p1"]):
        assert float(row[f"train/abl/p1/block{l + 1}"]) == pytest.approx(p1, abs=1e-6)


def trained_teacher(tmp_path):
    """A resnet8 trained for 2 epochs on all 1,437 digits (about 80 % top-1)."""
    cfg = resolve(["cifar100", "demo"], overrides=[f"out_dir={tmp_path}", "name=teacher", "data.image_size=16",
                                                   "model.name=resnet8", "optim.epochs=2", "optim.milestones=[]",
                                                   "log.progress=false",
                                                   "log.tensorboard=false", "data.train_size=null"])
    summary = Trainer(cfg).fit()
    assert summary["last_acc1"] > 50.0
    return tmp_path / "teacher" / "last.pth"


@pytest.mark.slow  # two runs (search, final), then resumed
def test_pipeline_runs_both_stages_learns_and_resumes(tmp_path, capsys):
    argv = ["abl", "--preset", "demo", f"out_dir={tmp_path}", "name=pipe", *FAST[1:],
            f"teacher.weights={trained_teacher(tmp_path)}", "data.train_size=null", "strategy.args.warm_steps=10",
            "strategy.args.meta_steps=10", "optim.epochs=2", "optim.milestones=[]", "--seeds", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "student weight p1 per block" in out and "2 seed(s)" in out
    root = tmp_path / "pipe"
    result = json.loads((root / "summary.json").read_text())
    # 1437 digits, 10 classes: chance is 10 %; two epochs of the ABL step must learn.
    assert all(s["last_acc1"] > 50.0 for s in result["final"]) and len(result["final"]) == 2
    search_rows = rows_of(root / "search" / "metrics.csv")
    assert all(float(r["train/loss"]) == float(r["train/loss"]) for r in search_rows)  # finite, not NaN
    assert (root / "final_seed1" / "summary.json").is_file()
    config_1 = (root / "final_seed1" / "config.yaml").read_text()
    assert "seed: 1" in config_1 and "gamma_from" in config_1
    # A final run killed before its first last.pth (here: after best.pth and the metrics were written) is redone
    # from the saved plan; the finished stages are kept as they are.
    search_checkpoint = (root / "search" / "last.pth").read_bytes()
    for name in ("last.pth", "summary.json"):
        (root / "final_seed1" / name).unlink()
    (root / "final_seed1" / ".last.pth.abc.tmp").write_bytes(b"half a checkpoint")
    assert main(["abl", "--resume", str(root)]) == 0
    assert (root / "search" / "last.pth").read_bytes() == search_checkpoint
    assert (root / "final_seed1" / "summary.json").is_file()
    assert main(argv) == 2  # the folder exists: never overwritten
    assert "already exists" in capsys.readouterr().err


def test_pipeline_refuses_a_given_gamma(tmp_path):
    cfg = config(tmp_path, "strategy=abl", "strategy.args.p1=[0.5,0.5]")
    with pytest.raises(Exception, match="searches gamma itself"):
        run_pipeline(cfg)


def test_pipeline_with_bad_input_leaves_no_folder(tmp_path, capsys):
    argv = ["abl", "--preset", "demo", f"out_dir={tmp_path / 'runs'}", "name=bad", *FAST[1:],
            f"teacher.weights={tmp_path / 'missing.pth'}"]
    assert main(argv) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "bad").exists()
