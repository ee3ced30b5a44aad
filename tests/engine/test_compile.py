"""compile=true (issue 13): compiled student and teacher forwards follow eager's losses; checkpoints load across.

Every run goes through the real Trainer on the embedded digits at 8x8 (resnet8 -> resnet8, batch 16): one step per
epoch, so the per-epoch `train/loss` rows are the per-step losses. kd x standard and kd x sakd compile with the
real default backend (inductor, C++ kernels built by gcc); the other combinations with `aot_eager`, which runs the
same capture (dynamo, fullgraph, AOT autograd's joint graph) but skips inductor's code generation, which costs
about a minute per new graph on 2 cores (inductor's cache under /tmp makes later runs of this file fast).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from adakd.engine import trainer as trainer_module
from adakd.engine.config import ConfigError, resolve
from adakd.engine.trainer import Trainer
from tiny_run import save_random_teacher

# torch.compile of every method and strategy; the inner loop `python -m pytest -m "not slow"` skips this file.
pytestmark = pytest.mark.slow

METHODS = ("kd", "at", "crd")
STRATEGIES = ("standard", "sakd", "abl")
INDUCTOR = {("kd", "standard"), ("kd", "sakd")}
STEPS = 5
RELATIVE = 1e-5  # |compiled - eager| <= RELATIVE * |eager|, per step
STRATEGY_ARGS = {"abl": ["strategy.args.p1=[0.3,0.6]"]}  # stage 2 at a given p (resnet8: 3 blocks)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_random_teacher(tmp_path_factory.mktemp("teacher") / "resnet8.pth", seed=1)


def config(tmp_path, teacher, method, strategy, compile_, name, epochs=STEPS):
    return resolve(["cifar100", "demo"], overrides=[
        f"out_dir={tmp_path}", f"name={name}", "data.image_size=8", "data.train_size=16", "data.batch_size=16",
        "log.progress=false", "log.tensorboard=false", "optim.milestones=[]", f"optim.epochs={epochs}",
        f"log.eval_every={epochs}", "threads=1", "task=distill", "model.name=resnet8", "teacher.name=resnet8",
        f"teacher.weights={teacher}", f"method={method}", f"strategy={strategy}", f"compile={str(compile_).lower()}",
        *(["distill.args.num_negatives=32"] if method == "crd" else []), *STRATEGY_ARGS.get(strategy, [])])


def use_backend(monkeypatch, backend):
    """The engine's own compile options with `backend` (None: the engine's default, inductor)."""
    options = trainer_module.compile_options
    if backend is not None:
        monkeypatch.setattr(trainer_module, "compile_options", lambda device: {**options(device), "backend": backend})


def fresh_compiler():
    """Forget earlier tests' compiled code: their cache entries would count against the recompile limit."""
    torch._dynamo.reset()
    counters.clear()


def losses(trainer) -> torch.Tensor:
    return torch.tensor([row["train/loss"] for row in trainer.run.rows], dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_losses_follow_eager(tmp_path, teacher, monkeypatch, capsys, method, strategy):
    eager = Trainer(config(tmp_path, teacher, method, strategy, False, "eager"))
    eager.fit()
    use_backend(monkeypatch, None if (method, strategy) in INDUCTOR else "aot_eager")
    fresh_compiler()
    compiled = Trainer(config(tmp_path, teacher, method, strategy, True, "compiled"))
    compiled.fit()
    assert "runs eagerly" not in capsys.readouterr().err  # no part fell back to eager
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled (ABL: the teacher only)
    a, b = losses(eager), losses(compiled)
    assert len(a) == len(b) == STEPS and torch.isfinite(a).all()
    difference = ((b - a).abs() / a.abs()).max().item()
    assert difference <= RELATIVE, f"relative difference {difference:.2e}: eager {a.tolist()}, compiled {b.tolist()}"


def state(trainer) -> dict[str, torch.Tensor]:
    checkpoint = trainer._checkpoint([])
    values = {f"model.{k}": v for k, v in checkpoint["model"].items()}
    values.update({f"strategy.{k}.{n}": v for k, part in checkpoint["strategy"].items() if isinstance(part, dict)
                   for n, v in part.items() if isinstance(v, torch.Tensor)})
    return values


def test_checkpoints_load_across_compile(tmp_path, teacher, monkeypatch):
    # kd x sakd: the checkpoint holds the student, the distiller, SAKD's policy and adapters.
    use_backend(monkeypatch, "aot_eager")
    fresh_compiler()
    straight = Trainer(config(tmp_path, teacher, "kd", "sakd", False, "straight", 2))
    straight.fit()
    reference = state(straight)
    for first, then in ((True, False), (False, True)):
        name = f"from_{first}"
        Trainer(config(tmp_path, teacher, "kd", "sakd", first, name, 1)).fit()
        saved = torch.load(tmp_path / name / "last.pth", weights_only=False)
        assert saved["model"].keys() == straight.student.model.state_dict().keys()
        resumed = Trainer.resume(tmp_path / name, ["optim.epochs=2", f"compile={str(then).lower()}"])
        assert resumed.epoch == 1 and resumed.config.compile is then
        resumed.fit()
        values = state(resumed)
        assert values.keys() == reference.keys()
        for key, value in values.items():
            assert torch.allclose(value.double(), reference[key].double(), rtol=RELATIVE, atol=1e-6), key


def test_a_part_that_fails_to_compile_runs_eagerly(tmp_path, teacher, monkeypatch, capsys):
    def broken(graph, example_inputs):
        raise RuntimeError("this backend cannot compile")

    eager = Trainer(config(tmp_path, teacher, "kd", "standard", False, "eager", 2))
    eager.fit()
    use_backend(monkeypatch, broken)
    fresh_compiler()
    fallen = Trainer(config(tmp_path, teacher, "kd", "standard", True, "fallen", 2))
    fallen.fit()
    err = capsys.readouterr().err
    assert err.count("the student runs eagerly") == 1 and err.count("the teacher runs eagerly") == 1
    # Compiling fails before anything runs, so the step that hit it is eager's step exactly.
    assert torch.equal(losses(fallen), losses(eager))


def test_compile_must_be_a_bool():
    with pytest.raises(ConfigError, match="compile: expected bool"):
        resolve(overrides=["compile=fast"])
