"""`adakd export RUN`: the student alone (keys as its source builds it), TorchScript and ONNX equal to PyTorch, the
model card's numbers against independent computation, and each bad input as one line."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from data.fake_data_files import write_idx  # tests/data, through the rootdir on sys.path
from safetensors.torch import load_file
from torch import nn

from adakd import data, models
from adakd.cli import main
from adakd.engine.config import from_dict, resolve
from adakd.engine.export import count_macs, export_student
from adakd.models.layers import with_input_channels
from cli_checks import fails, snapshot
from tiny_run import TINY_RUN, save_random_teacher

QUICK = ["--preset", "demo", *TINY_RUN, "threads=1"]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def make_run(out: Path, name: str, *overrides: str, task: str = "distill") -> Path:
    """A one-epoch run on the embedded digits (a distillation under a random resnet14 teacher unless task=train)."""
    teacher = out / "resnet14_teacher.pth"
    if task == "distill" and not teacher.is_file():
        save_random_teacher(teacher, "resnet14", epoch=240)
    teacher_args = ["teacher.name=resnet14", f"teacher.weights={teacher}"] if task == "distill" else []
    assert main([task, *QUICK, f"out_dir={out}", f"name={name}", *teacher_args, *overrides]) == 0
    return out / name


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("export"), "kd")


def digits_batch(n: int = 6) -> torch.Tensor:
    test = data.load_dataset("digits", "test", image_size=8)
    return torch.stack([test[i][0] for i in range(n)])


def trained_student(run: Path, checkpoint: str = "last") -> nn.Module:
    """resnet8 with the run checkpoint's student weights, loaded independently of export."""
    model = models.create("resnet8", num_classes=10)
    model.load_state_dict(torch.load(run / f"{checkpoint}.pth", weights_only=True)["model"])
    return model.eval()


def card_of(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def test_distilled_student_is_written_alone_and_loads_strictly_in_the_zoo(kd_run: Path, tmp_path: Path) -> None:
    path = export_student(kd_run, out=tmp_path / "student.safetensors", latency_batch=0)
    tensors = load_file(path)
    state = torch.load(kd_run / "last.pth", weights_only=True)
    assert set(tensors) == set(state["model"])  # the student's own keys, nothing of teacher, distiller or optimiser
    model = models.create("resnet8", num_classes=10)
    model.load_state_dict(tensors)  # strict
    model.eval()
    images = digits_batch()
    with torch.no_grad():
        assert torch.equal(model(images), trained_student(kd_run)(images))
    # best.pth is its own file: a best.pth with other weights must give those weights.
    torch.manual_seed(5)
    state["model"], state["epoch"] = models.create("resnet8", num_classes=10).state_dict(), 7
    best_run = tmp_path / "copy"
    shutil.copytree(kd_run, best_run)
    torch.save(state, best_run / "best.pth")
    best = load_file(export_student(best_run, checkpoint="best", latency_batch=0))
    assert best_run / "export" / "resnet8-best.safetensors" in list((best_run / "export").iterdir())
    assert all(torch.equal(best[k], v) for k, v in state["model"].items())


@pytest.mark.parametrize("strategy", [["strategy=sakd"], ["strategy=abl", "strategy.args.p1=[0.5,0.5]"]],
                         ids=["sakd", "abl"])
def test_strategy_parts_stay_behind(tmp_path: Path, strategy: list[str]) -> None:
    """SAKD's policy and ABL's auxiliary heads are saved in the run checkpoint but are not the student."""
    run = make_run(tmp_path, "run", *strategy)
    state = torch.load(run / "last.pth", weights_only=True)
    strategy_tensors = [v for v in json_leaves(state["strategy"]) if isinstance(v, torch.Tensor)]
    assert strategy_tensors, "the strategy saved no learnt parts: this run would not test that they stay behind"
    tensors = load_file(export_student(run, latency_batch=0))
    assert set(tensors) == set(state["model"])
    model = models.create("resnet8", num_classes=10)
    model.load_state_dict(tensors)
    model.eval()
    images = digits_batch()
    with torch.no_grad():
        assert torch.equal(model(images), trained_student(run)(images))


def json_leaves(value):
    """Every leaf of nested dicts and lists."""
    if isinstance(value, dict):
        for item in value.values():
            yield from json_leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from json_leaves(item)
    else:
        yield value


def test_model_card_numbers_match_independent_computation(kd_run: Path, tmp_path: Path) -> None:
    path = export_student(kd_run, out=tmp_path / "m.safetensors", latency_batch=4, latency_runs=3)
    card = card_of(path)
    tensors = load_file(path)
    # Parameters summed by hand from the file: every tensor but BatchNorm's running statistics.
    assert card["student"]["params"] == sum(v.numel() for k, v in tensors.items() if not k.endswith(BUFFERS))
    teacher = models.create("resnet14", num_classes=10)
    assert card["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    # MACs: resnet8's 3x3 convolutions and classifier at 8 x 8, summed by hand from its layers' shapes.
    assert card["student"]["macs"] == conv_linear_macs(models.create("resnet8", num_classes=10), 8)
    assert card["teacher"]["macs"] == conv_linear_macs(teacher, 8)
    rows = [json.loads(line) for line in (kd_run / "metrics.jsonl").read_text().splitlines()]
    assert card["accuracy"]["last"] == {"epoch": 1, "top1": rows[-1]["test/acc1"], "top5": rows[-1]["test/acc5"]}
    assert card["accuracy"]["best"]["top1"] == rows[-1]["test/acc1"]
    assert card["teacher"]["top1"] == json.loads((kd_run / "teacher.json").read_text())["acc1"]
    assert card["teacher"]["name"] == "resnet14" and card["teacher"]["weights"].endswith("resnet14_teacher.pth")
    test = data.load_dataset("digits", "test", image_size=8)
    assert card["classes"] == [str(d) for d in range(10)] == test.classes
    assert card["input"] == {"shape": [3, 8, 8], "mean": list(test.mean), "std": list(test.std),
                             "preprocessing": card["input"]["preprocessing"]}
    assert card["architecture"] == {"name": "resnet8", "source": "adakd", "arch": "resnet8", "num_classes": 10,
                                    "in_chans": 3, "width_mult": None, "args": {}}
    assert (card["task"], card["method"], card["strategy"]) == ("distill", "kd", "standard")
    assert from_dict(card["config"]) == resolve(files=[kd_run / "config.yaml"])
    assert card["adakd_version"] == json.loads((kd_run / "meta.json").read_text())["adakd_version"]
    latency = card["student"]["cpu_latency"]
    assert (latency["batch"], latency["runs"], latency["threads"]) == (4, 3, torch.get_num_threads())
    assert latency["median_ms"] > 0 and card["teacher"]["cpu_latency"]["batch"] == 4
    markdown = path.with_name(path.name + ".md").read_text()
    assert f"| parameters | {card['student']['params']:,} | {card['teacher']['params']:,} |" in markdown
    assert 'models.create("resnet8", num_classes=10)' in markdown


def conv_linear_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates of every Conv2d and Linear, from their shapes and the feature map sizes hooks see."""
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() * k
        else:
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return total


def test_macs_of_a_tiny_net_by_hand() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    # conv: 4 output maps of 8 x 8, each value 1 x 3 x 3 products; linear: 256 x 10 products.
    assert count_macs(net, (1, 8, 8)) == 4 * 8 * 8 * 9 + 256 * 10


def test_torchscript_equals_the_pytorch_student(kd_run: Path, tmp_path: Path) -> None:
    path = export_student(kd_run, format="torchscript", out=tmp_path / "s.pt", latency_batch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 calls TorchScript deprecated; it still loads
        loaded = torch.jit.load(str(path))
    images = digits_batch()
    with torch.no_grad():
        assert torch.allclose(loaded(images), trained_student(kd_run)(images), atol=1e-6, rtol=0)
    assert card_of(path)["check"]["max_abs_diff"] <= 1e-6


def test_onnx_equals_the_pytorch_student_within_1e_4(kd_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    path = export_student(kd_run, format="onnx", out=tmp_path / "s.onnx", latency_batch=0)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = digits_batch(5)  # another batch size than the one traced: the batch axis is dynamic
    got = torch.from_numpy(session.run(None, {"input": images.numpy()})[0])
    with torch.no_grad():
        assert (got - trained_student(kd_run)(images)).abs().max() <= 1e-4
    assert card_of(path)["check"]["runtime"].startswith("onnxruntime")


def test_grayscale_width_multiplied_student_loads_as_the_card_says(tmp_path: Path, capsys) -> None:
    """A 1-channel mobilev2 x0.25 on Fashion-MNIST IDX files: the snippet in the card builds the model that loads."""
    from test_own_data import banded  # tests/engine, the same rootdir import

    raw = tmp_path / "FashionMNIST" / "raw"
    for prefix, n, seed in (("train", 32, 0), ("t10k", 20, 1)):
        images, labels = banded(n, 10, 28, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 0x803)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 0x801)
    argv = ["train", "dataset=fashion-mnist", f"data.root={tmp_path}", "data.image_size=16", "epochs=1",
            f"out_dir={tmp_path / 'runs'}", "name=fm", "log.progress=false", "log.tensorboard=false",
            "model.name=mobilev2", "model.width_mult=0.25", "data.batch_size=16", "data.num_workers=0",
            "optim.milestones=[]", "threads=1"]
    assert main(argv) == 0
    run = tmp_path / "runs" / "fm"
    capsys.readouterr()
    assert main(["export", str(run), "--latency-batch", "0"]) == 0
    out = capsys.readouterr().out
    path = run / "export" / "mobilev2-last.safetensors"
    assert f"to {path}" in out
    card = card_of(path)
    assert card["architecture"]["in_chans"] == 1 and card["architecture"]["width_mult"] == 0.25
    assert card["classes"][0] == "T-shirt/top" and card["input"]["shape"] == [1, 16, 16]
    namespace: dict = {}
    exec(card["load"].replace('"mobilev2-last.safetensors"', repr(str(path))), namespace)  # the card's own recipe
    model = with_input_channels(models.create("mobilev2", num_classes=10, width_mult=0.25), 1)
    model.load_state_dict(load_file(path))
    images = torch.randn(3, 1, 16, 16)
    reference = models.create("mobilev2", num_classes=10, width_mult=0.25)
    reference = with_input_channels(reference, 1)
    reference.load_state_dict(torch.load(run / "last.pth", weights_only=True)["model"])
    with torch.no_grad():
        expected = reference.eval()(images)
        assert torch.equal(namespace["model"](images), expected) and torch.equal(model.eval()(images), expected)
    # Without the dataset on this machine the student still exports; the card then has no class names.
    shutil.rmtree(tmp_path / "FashionMNIST")
    card = card_of(export_student(run, out=tmp_path / "again.safetensors", latency_batch=0))
    assert card["classes"] is None and card["architecture"]["num_classes"] == 10 and "not found" in card["note"]


@pytest.mark.parametrize("name, build", [
    ("timm:resnet10t", lambda: __import__("timm").create_model("resnet10t", num_classes=10, in_chans=3)),
    ("torchvision:mobilenet_v3_small",
     lambda: __import__("torchvision").models.get_model("mobilenet_v3_small", num_classes=10)),
], ids=["timm", "torchvision"])
def test_external_student_loads_strictly_in_its_own_library(tmp_path: Path, name: str, build) -> None:
    if name.startswith("timm"):
        pytest.importorskip("timm")
    run = make_run(tmp_path, "ext", f"model.name={name}", "data.image_size=32", "data.train_size=32", task="train")
    path = export_student(run, latency_batch=0)
    model = build()
    model.load_state_dict(load_file(path))  # strict: keys exactly as timm / torchvision build the model
    model.eval()
    reference = build()
    reference.load_state_dict(torch.load(run / "last.pth", weights_only=True)["model"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), reference.eval()(images))
    card = card_of(path)
    assert card["architecture"]["source"] == name.split(":")[0] and card["method"] is None
    assert card["teacher"] is None






def test_export_of_what_is_not_a_run_folder(tmp_path: Path, capsys) -> None:
    fails(capsys, ["export", str(tmp_path / "nowhere")], "no such folder")
    (tmp_path / "notes.txt").write_text("x")
    fails(capsys, ["export", str(tmp_path / "notes.txt")], "it is a file", "run folder")
    (tmp_path / "empty").mkdir()
    fails(capsys, ["export", str(tmp_path / "empty")], "is not a run folder", "no last.pth, best.pth or config.yaml")
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "pipeline.yaml").write_text("{}")
    fails(capsys, ["export", str(tmp_path / "abl")], "`adakd abl` pipeline folder", "final_seed0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abl", "empty", "notes.txt"]
    assert not any((tmp_path / "empty").iterdir())


def test_export_of_a_missing_checkpoint_names_the_other(kd_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(kd_run, run, ignore=shutil.ignore_patterns("export"))
    (run / "best.pth").unlink()
    before = snapshot(run)
    fails(capsys, ["export", str(run), "--checkpoint", "best"], "has no best.pth", "--checkpoint last")
    (run / "last.pth").unlink()
    fails(capsys, ["export", str(run)], "has no last.pth", "no best.pth either")
    assert snapshot(run) == {k: v for k, v in before.items() if k != "last.pth"}


def test_export_with_an_unknown_format(kd_run: Path, capsys) -> None:
    before = snapshot(kd_run)
    fails(capsys, ["export", str(kd_run), "--format", "tflite"], "unknown export format 'tflite'",
          "safetensors (default), torchscript or onnx")
    assert snapshot(kd_run) == before


def test_export_out_path_checks(kd_run: Path, tmp_path: Path, capsys) -> None:
    fails(capsys, ["export", str(kd_run), "--out", str(tmp_path / "no" / "such" / "m.safetensors")],
          "does not exist; create it first")
    assert not (tmp_path / "no").exists()
    out = tmp_path / "m.safetensors"
    assert main(["export", str(kd_run), "--out", str(out), "--latency-batch", "0"]) == 0
    before = snapshot(tmp_path)
    fails(capsys, ["export", str(kd_run), "--out", str(out)], "already exist", "--force")
    assert snapshot(tmp_path) == before  # nothing replaced
    out.with_name("m.safetensors.json").unlink()  # the card alone existing is refused too
    fails(capsys, ["export", str(kd_run), "--out", str(out)], "m.safetensors", "--force")
    capsys.readouterr()
    assert main(["export", str(kd_run), "--out", str(out), "--force", "--latency-batch", "0"]) == 0
    assert card_of(out)["file"] == "m.safetensors" and not list(tmp_path.glob(".*.tmp"))
    # --out's suffix picks the format when --format is not given.
    assert main(["export", str(kd_run), "--out", str(tmp_path / "m.pt"), "--latency-batch", "0"]) == 0
    assert card_of(tmp_path / "m.pt")["file_format"] == "torchscript"


def test_onnx_without_the_extra_is_one_line(kd_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("onnx", "onnxscript") else find_spec(name, *args))
    fails(capsys, ["export", str(kd_run), "--format", "onnx", "--out", str(tmp_path / "s.onnx")],
          'pip install "adakd[onnx]"')
    assert not any(tmp_path.iterdir())

