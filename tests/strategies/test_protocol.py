"""The strategy protocol (strategies/base.py): a one-file strategy using every hook runs through the Trainer, and the
engine names no strategy."""
from __future__ import annotations

import copy
import io
import json
import math
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import Tensor, nn

import adakd.engine
from adakd.engine.config import resolve
from adakd.engine.resumable import clear_unfinished
from adakd.engine.trainer import Trainer
from adakd.experiments.decisions import export_decisions
from adakd.strategies.base import RunFacts, Strategy
from adakd.strategies.registry import STRATEGIES
from adakd.strategies.standard import Standard
from tiny_run import TINY_RUN

NAME = "protocol-probe"


@dataclass(frozen=True)
class ProbeOptions:
    """Options of the probe: three filled in from the run's facts, the rest from preset and user args."""

    input_shape: tuple = ()
    num_classes: int = 0
    run_steps: int | None = None
    held_out: float = 0.5
    teacher: str = "pretrained"
    scale: float = 1.0


class Probe(Standard):
    """Standard's step plus every hook of the protocol, each recording how it was called."""

    option_class = ProbeOptions
    preset = {"teacher": "scratch", "scale": 0.5}
    run_files = ("probe.csv", "probe.json")
    max_steps = 3
    calls: dict[str, list[Any]] = {}

    @classmethod
    def note(cls, hook: str, value: Any = None) -> None:
        cls.calls.setdefault(hook, []).append(value)

    @classmethod
    def options_from_facts(cls, facts: RunFacts) -> dict[str, Any]:
        cls.note("options_from_facts", facts)
        return {"input_shape": facts.input_shape, "num_classes": facts.num_classes, "run_steps": facts.run_steps}

    @classmethod
    def needs_teacher_weights(cls, options: ProbeOptions) -> bool:
        cls.note("needs_teacher_weights", options)
        return options.teacher != "scratch"

    @classmethod
    def validation_fraction(cls, options: ProbeOptions) -> float:
        cls.note("validation_fraction", options)
        return options.held_out

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head = nn.BatchNorm1d(4)  # owned, so converted to SyncBN under DDP
        self.val_seen = 0
        self.rows: list[dict[str, Any]] = []
        self.steps = 0

    @property
    def validation_batches_used(self) -> int:
        return self.val_seen

    def attach_validation(self, batches: Iterator) -> None:
        self.note("attach_validation", self.val_seen)
        self.val_batches = batches

    def owned_modules(self) -> list[nn.Module]:
        return [self.head]

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        val_images, _, _ = next(self.val_batches)  # a held-out batch every step
        self.val_seen += 1
        self.steps += 1
        self.rows.append({"step": step, "held_out": len(val_images)})
        return super().training_step(images, targets, indices, epoch, step)

    def should_stop(self) -> bool:
        return self.steps >= self.max_steps

    def start_notices(self) -> list[tuple[str, bool]]:
        return [("probe: started", False)]

    def evaluate(self, loader) -> dict[str, float]:
        return {"probe": 1.0}

    def drain_records(self) -> dict[str, list[dict[str, Any]]]:
        rows, self.rows = self.rows, []
        return {"probe": rows}

    def artifacts(self) -> dict[str, Any]:
        return {"probe": {"held_out_batches": self.val_seen}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "val_seen": self.val_seen, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.val_seen, self.steps = state["val_seen"], state["steps"]

    def decision_names(self) -> list[str]:
        return ["everything"]

    def decide(self, images: Tensor) -> tuple[Tensor, Tensor]:
        self.note("decide", len(images))
        ones = torch.ones(len(images), 1)
        return ones, ones


def test_every_hook_is_called_with_the_runs_facts(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES._builders, NAME, Probe)
    monkeypatch.setattr(Probe, "calls", {})
    monkeypatch.delenv("ADAKD_TEACHERS", raising=False)
    # No teacher.weights: the probe says it needs none (a strategy that redraws its teacher).
    config = resolve(["cifar100"], overrides=[*TINY_RUN, "data.name=digits", f"out_dir={tmp_path}", "name=run",
                                              "task=distill", "teacher.name=resnet8", "method=kd",
                                              f"strategy={NAME}", "strategy.args.held_out=0.25"])
    trainer = Trainer(config)
    facts = Probe.calls["options_from_facts"][0]
    assert facts == RunFacts(input_shape=tuple(trainer.train_set[0][0].shape), num_classes=10,
                             run_steps=1 * math.ceil(64 / 32))  # optim.epochs over the whole set, before the split
    options = trainer.strategy.options
    assert options == ProbeOptions(facts.input_shape, 10, 2, held_out=0.25, teacher="scratch", scale=0.5)
    assert Probe.calls["validation_fraction"][0] == options and Probe.calls["needs_teacher_weights"][0] == options
    held = len(trainer.val_set)  # a quarter of each class, rounded per class
    assert abs(held - 16) <= 3 and held + len(trainer.train_set) == 64 and trainer.strategy.needs_validation
    assert trainer.epochs == 2  # max_steps=3 over 2 batches an epoch
    assert Probe.calls["attach_validation"] == [0]
    summary = trainer.fit()
    run = tmp_path / "run"
    # The engine asks should_stop between epochs: 2 epochs of 2 steps, one held-out batch each.
    assert summary["epochs"] == 2 and trainer.strategy.val_seen == 4 and trainer.strategy.should_stop()
    assert json.loads((run / "probe.json").read_text()) == {"held_out_batches": 4}
    assert len((run / "probe.csv").read_text().splitlines()) == 5
    assert "test/probe" in (run / "metrics.csv").read_text().splitlines()[0]
    assert "probe: started" in (run / "log.txt").read_text()
    assert len(json.loads((run / "split.json").read_text())["held_out"]) == held

    # A resume restores the strategy's state and positions the held-out stream after the batches it used.
    path, skipped, name = export_decisions(run, "0", batch_size=32)
    assert Probe.calls["attach_validation"] == [0, 4] and name == "everything" and skipped == []
    assert sum(Probe.calls["decide"]) == 64 - held and path.is_file()


def test_a_restart_keeps_the_files_a_strategy_declares(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES._builders, NAME, Probe)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "probe.csv", "probe.json", "abl_gamma.csv", "gamma.json"):
        (run / name).write_text("")
    clear_unfinished(run)  # only files a run writes before its first checkpoint: removed, not refused
    assert not run.exists()


def test_the_protocols_defaults_do_nothing():
    assert Strategy.resolve_options({}) is None and Strategy.validation_fraction(None) is None
    assert Strategy.needs_teacher_weights(None) and Strategy.search_strategy is None
    assert Strategy.run_files == () and Strategy.search_options == () and Strategy.preset == {}
    assert Strategy.option_class is None and Strategy.max_steps is None


# The words of the strategies the engine must not name outside comments (`grep -w`, case-sensitive).
STRATEGY_WORDS = re.compile(r"\b(sakd|abl|teacher_init|val_fraction|gamma)\b")
ALLOWED = ["is an `adakd abl` pipeline folder"]  # export's message about the pipeline's folder


def test_the_engine_names_no_strategy_and_probes_none():
    found = []
    for path in sorted(Path(adakd.engine.__file__).parent.glob("*.py")):
        text = path.read_text()
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.COMMENT or any(allowed in token.string for allowed in ALLOWED):
                continue
            if STRATEGY_WORDS.search(token.string):
                found.append(f"{path.name}:{token.start[0]}: {token.string[:60]}")
        for match in re.finditer(r"(getattr|hasattr)\(([^)]*)\)", text):
            if "strateg" in match.group(2):
                found.append(f"{path.name}: {match.group(0)}")
    assert found == []


def test_owned_modules_are_trained_grouped_checkpointed_and_restored_by_the_base_class():
    """`own` is the one container: SAKD's policy and adapters and ABL's heads go through it, with the checkpoint
    entries and optimiser order the hand-written methods had (so old checkpoints keep loading)."""
    from step_rig import build_strategy

    sakd = build_strategy("sakd", "at", {"input_size": 16})
    assert [m for m in sakd.owned_modules()] == [sakd.policy, sakd.adapters]
    agent = sakd.param_groups()["agent"]
    assert [id(p) for p in agent["params"]] == [id(p) for p in [*sakd.policy.parameters(), *sakd.adapters.parameters()]]
    main = sakd.param_groups()["main"]
    assert not {id(p) for p in main} & {id(p) for p in agent["params"]}
    sakd.train(False)
    assert not sakd.policy.training and not any(m.training for m in sakd.adapters.modules())
    sakd.train(True)
    assert sakd.policy.training and all(m.training for m in sakd.adapters.modules())
    state = copy.deepcopy(sakd.state_dict())  # a state_dict holds the live tensors; the copy is the checkpoint
    assert set(state) >= {"distiller", "policy", "adapters"}
    with torch.no_grad():
        before = sakd.policy.weight.clone()
        sakd.policy.weight.add_(1.0)
    sakd.load_state_dict(state)
    assert torch.equal(sakd.policy.weight, before)  # restored from the entry, not left as edited
    with pytest.raises(ValueError, match="checkpoint has no adapters for SAKD: it was written by another strategy"):
        sakd.load_state_dict({k: v for k, v in state.items() if k != "adapters"})
    with pytest.raises(ValueError, match="owns a module named 'policy' already"):
        sakd.own("policy", nn.Linear(1, 1))

    abl = build_strategy("abl-fixed", "kd", {"input_size": 16})
    main = abl.param_groups()["main"]
    student_and_distiller = [p for p in abl.student.parameters() if p.requires_grad]
    heads = [p for head in abl.heads for p in head.parameters()]
    assert [id(p) for p in main] == [id(p) for p in [*student_and_distiller, *heads]]  # the order optimiser state keys
    assert "heads" in abl.state_dict() and abl.owned_modules() == [abl.heads]
