"""A new strategy with options, held-out data, figures and a search stage is one file: this one.

`onefile-search` counts the held-out batches it sees and writes the count (found.json, and a row per step in
found_steps.csv); `onefile` declares it as its search stage, takes the count through `handoff` and logs it. Both are
registered only for the test and driven through the real pipeline, `adakd plot`, `adakd decisions` and `adakd distill`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml
from torch import Tensor, nn

from adakd.cli import main
from adakd.engine.config import resolve
from adakd.experiments.pipeline import format_pipeline, run_pipeline
from adakd.strategies.base import Band, Figure, OptionError, RunFacts
from adakd.strategies.registry import STRATEGIES
from adakd.strategies.standard import Standard
from cli_checks import fails
from tiny_run import TINY_RUN

SEARCH, FINAL = "onefile-search", "onefile"


@dataclass(frozen=True)
class OneFileOptions:
    """Options of both stages: a held-out share, a scale (checked), the run's class count (from its facts) and the
    search's result (`found_from`: the search run folder)."""

    held_out: float = 0.5
    scale: float = 1.0
    teacher: str = "pretrained"
    num_classes: int = 0
    found_from: str | None = None

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise OptionError("scale", f"must be > 0, got {self.scale!r}")


def last_held_out_step(run_dir: Path) -> float | None:
    """Where the search figure's band ends: the step count the search recorded in found.json."""
    path = run_dir / "found.json"
    return float(json.loads(path.read_text())["steps"]) if path.is_file() else None


class OneFileBase(Standard):
    """What both stages share: their options, filled from the run's facts, and when a teacher is needed."""

    option_class = OneFileOptions

    @classmethod
    def options_from_facts(cls, facts: RunFacts) -> dict[str, Any]:
        return {"num_classes": facts.num_classes}

    @classmethod
    def needs_teacher_weights(cls, options: OneFileOptions) -> bool:
        return options.teacher != "scratch"


class OneFileSearch(OneFileBase):
    """Standard's step, plus one held-out batch per step; the result is how many held-out samples it saw."""

    preset = {"teacher": "scratch", "held_out": 0.25}
    run_files = ("found.json", "found_steps.csv")
    figures = (Figure("found_trajectory", "held-out samples seen per step", "held-out samples",
                      columns=r"^seen$", kind="steps", source="found_steps.csv", x="step", xlabel="training step",
                      label="full", band=Band("first step", end=last_held_out_step)),)

    @classmethod
    def validation_fraction(cls, options: OneFileOptions) -> float:
        return options.held_out

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = 0  # held-out samples
        self.batches = 0
        self.rows: list[dict[str, Any]] = []

    @property
    def validation_batches_used(self) -> int:
        return self.batches

    def attach_validation(self, batches: Iterator) -> None:
        self.val_batches = batches

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        held_images, _, _ = next(self.val_batches)
        self.seen += len(held_images)
        self.batches += 1
        self.rows.append({"step": step, "seen": self.seen})
        return super().training_step(images, targets, indices, epoch, step)

    def drain_records(self) -> dict[str, list[dict[str, Any]]]:
        rows, self.rows = self.rows, []
        return {"found_steps": rows}

    def artifacts(self) -> dict[str, Any]:
        return {"found": {"seen": self.seen, "steps": self.batches}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seen": self.seen, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen, self.batches = state["seen"], state["batches"]


class OneFile(OneFileBase):
    """Standard's step on the whole training set, logging what the search found; an owned head; one decision."""

    preset = {"teacher": "scratch"}
    search_strategy = SEARCH
    search_options = ("found_from",)
    searched = "the held-out count"
    figures = (Figure("onefile_found", "what the search found", "held-out samples", columns=r"^train/onefile/"),)
    not_loss_columns = ("train/onefile/",)

    @classmethod
    def search_overrides(cls) -> dict[str, Any]:
        return {"optim": {"weight_decay": 0.0}}

    @classmethod
    def handoff(cls, search_dir: Path) -> dict[str, Any]:
        return {"found_from": str(search_dir)}

    @classmethod
    def describe_search(cls, search_dir: Path) -> str:
        found = json.loads((search_dir / "found.json").read_text())
        return f"search: {search_dir} saw {found['seen']} held-out samples"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.found = float(json.loads((Path(self.options.found_from) / "found.json").read_text())["seen"])
        # Owned: its own optimiser "head", train/eval mode, checkpoint entry "head", SyncBN under DDP.
        self.head = self.own("head", nn.BatchNorm1d(self.options.num_classes), group="head")

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        out = super().training_step(images, targets, indices, epoch, step)
        head_loss = self.head(self.student(images).features[-1].detach()).square().mean()
        self.optimizer_step(self.optimizers["head"], head_loss)
        out["onefile/found"] = torch.tensor(self.found)
        return out

    def decision_names(self) -> list[str]:
        return ["everything"]

    def decide(self, images: Tensor) -> tuple[Tensor, Tensor]:
        ones = torch.ones(len(images), 1)
        return ones, ones


@pytest.fixture
def registered(monkeypatch):
    """Both stages registered under test-only names for this test alone; no zoo teacher from the environment."""
    monkeypatch.setitem(STRATEGIES._builders, SEARCH, OneFileSearch)
    monkeypatch.setitem(STRATEGIES._builders, FINAL, OneFile)
    monkeypatch.delenv("ADAKD_TEACHERS", raising=False)


def overrides(tmp_path: Path, *more: str) -> list[str]:
    # No teacher.weights: both stages say they need none (their preset's teacher=scratch).
    return [*TINY_RUN, "data.name=digits", f"out_dir={tmp_path}", "name=pipe", "task=distill",
            "teacher.name=resnet8", "method=kd", "threads=1", *more]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_one_file_strategy_runs_its_search_then_its_final_run(tmp_path, registered, capsys):
    config = resolve(["cifar100"], overrides=overrides(tmp_path, f"strategy={FINAL}"))
    result = run_pipeline(config, seeds=2)
    root = tmp_path / "pipe"
    assert sorted(p.name for p in root.iterdir()) == ["final_seed0", "final_seed1", "pipeline.yaml", "search",
                                                      "summary.json"]
    assert yaml.safe_load((root / "pipeline.yaml").read_text())["strategy"] == FINAL

    # The search stage: its own strategy, its overrides, a quarter of the 64 digits held out and one held-out
    # batch read per training step (48 images in batches of 32: 2 steps of at most 32 held-out samples each).
    search = yaml.safe_load((root / "search" / "config.yaml").read_text())
    assert search["strategy"]["name"] == SEARCH and search["optim"]["weight_decay"] == 0.0
    held = len(json.loads((root / "search" / "split.json").read_text())["held_out"])
    assert 14 <= held <= 18
    found = json.loads((root / "search" / "found.json").read_text())
    assert found == {"seen": 2 * held, "steps": 2}  # 2 steps, each one whole held-out batch (held < 32)
    assert [int(r["seen"]) for r in read_rows(root / "search" / "found_steps.csv")] == [held, 2 * held]

    # The final runs: the strategy itself, the handoff in their args, the whole training set, the found value logged.
    for seed in (0, 1):
        final = yaml.safe_load((root / f"final_seed{seed}" / "config.yaml").read_text())
        assert final["strategy"] == {"name": FINAL, "args": {"found_from": str(root / "search")}}
        assert final["optim"]["weight_decay"] != 0.0 and final["seed"] == seed
        assert not (root / f"final_seed{seed}" / "split.json").exists()
        row = read_rows(root / f"final_seed{seed}" / "metrics.csv")[-1]
        assert float(row["train/onefile/found"]) == 2 * held
        state = torch.load(root / f"final_seed{seed}" / "last.pth", weights_only=False)["strategy"]
        assert set(state["head"]) >= {"weight", "bias", "running_mean"}  # the owned head is checkpointed
    assert [s["run_dir"] for s in result["final"]] == [str(root / "final_seed0"), str(root / "final_seed1")]
    assert format_pipeline(result).splitlines()[0] == f"search: {root / 'search'} saw {2 * held} held-out samples"

    # Its figures: the search's per-step figure from its run file (banded where found.json says), the final's
    # per-epoch one, and the found value kept out of the loss terms.
    assert main(["plot", str(root)]) == 0
    printed = [Path(p) for p in capsys.readouterr().out.split()]
    assert root / "search" / "plots" / "found_trajectory.png" in printed
    assert root / "final_seed0" / "plots" / "onefile_found.png" in printed
    assert root / "search" / "plots" / "onefile_found.png" not in printed  # the search logs no found column
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in printed)

    # Its decisions export, one column per declared decision.
    assert main(["decisions", str(root / "final_seed0"), "--spot", "everything"]) == 0
    decisions = read_rows(root / "final_seed0" / "decisions.csv")
    assert len(decisions) == 64 and {r["d/everything"] for r in decisions} == {"1"}

    # A resume of the finished pipeline reads the summaries back, and a given result skips the search.
    assert run_pipeline(None, root=root, resume=True)["final"] == result["final"]
    with pytest.raises(Exception, match="searches the held-out count itself; .* strategy.args.found_from=RUN_DIR"):
        run_pipeline(resolve(["cifar100"], overrides=overrides(tmp_path, f"strategy={FINAL}", "name=again",
                                                                 f"strategy.args.found_from={root / 'search'}")))


def test_its_figure_band_and_option_error(tmp_path, registered, capsys, monkeypatch):
    figures: dict[str, list] = {}
    from matplotlib.figure import Figure as PlotFigure

    save = PlotFigure.savefig

    def record(fig, path, *args, **kwargs):
        figures[Path(path).name] = [(p.get_x(), p.get_x() + p.get_width()) for p in fig.axes[0].patches]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(PlotFigure, "savefig", record)
    run = tmp_path / "search"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"strategy": {"name": SEARCH}}))
    (run / "metrics.csv").write_text("epoch,train/loss,test/acc1\n1,2.0,10.0\n")
    (run / "found_steps.csv").write_text("step,seen\n0,16\n1,32\n2,48\n")
    (run / "found.json").write_text(json.dumps({"seen": 48, "steps": 2}))
    assert main(["plot", str(run)]) == 0
    assert figures["found_trajectory.png"] == [(0.0, 2.0)]  # the band ends where found.json says

    fails(capsys, ["distill", "--preset", "cifar100", *overrides(tmp_path / "bad", f"strategy={FINAL}",
                                                                  "strategy.args.scale=-1")],
          "strategy.args.scale: must be > 0, got -1")
    assert not (tmp_path / "bad").exists()


def test_a_figure_declared_wrong_fails_where_it_is_declared():
    with pytest.raises(ValueError, match="Figure 'x': kind must be one of \\('epochs', 'steps', 'blocks'\\), got 'bars'"):
        Figure("x", "t", "y", columns="a", kind="bars")
    with pytest.raises(ValueError, match="Figure 'x': label must be 'full', 'tail' or 'last', got 'short'"):
        Figure("x", "t", "y", columns="a", label="short")
    blocks = Figure("x", "t", "y", columns=r"^acc/block\d+$", kind="blocks", last="acc1")
    row = {"acc/block10": 3.0, "acc/block9": 2.0, "acc/block1": 1.0, "acc1": 4.0}
    assert blocks.by_blocks([row]) == ([1, 9, 10, 11], [1.0, 2.0, 3.0, 4.0])
    assert blocks.by_blocks([{"acc/block1": 1.0}]) is None  # without its last column
