"""Pretrained timm / torchvision weights, offline: every test writes the cache or file the library reads.

timm reads the Hugging Face hub cache (models--timm--<name>/snapshots/<rev>/model.safetensors + refs/main) with
HF_HUB_OFFLINE=1; torchvision reads $TORCH_HOME/hub/checkpoints/<the enum's file name>. The models are the smallest
with published weights: timm's test_resnet.r160_in1k (0.5 M parameters) and torchvision's squeezenet1_1.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from adakd import models
from adakd.cli import main
from adakd.models.external import adapt_input_conv, pretrained_preprocessing
from adakd.registry import UnknownNameError
from cli_checks import fails, hub_cache_weights

timm = pytest.importorskip("timm")
huggingface_hub = pytest.importorskip("huggingface_hub")

TIMM_NAME = "test_resnet.r160_in1k"
TV_FILE = "squeezenet1_1-b8a52dc0.pth"  # SqueezeNet1_1_Weights.IMAGENET1K_V1's file name (its url's basename)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """$TORCH_HOME in tmp: torch.hub.get_dir() is $TORCH_HOME/hub."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert Path(torch.hub.get_dir()) == checkpoints.parent
    return checkpoints


def differing(published: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Keys whose tensor in `model` is not exactly the published one."""
    own = model.state_dict()
    return sorted(k for k, v in published.items() if own[k].shape != v.shape or not torch.equal(own[k], v))


def test_timm_pretrained_loads_the_hub_cache_all_but_the_classifier(hub_cache):
    published = hub_cache_weights(hub_cache, TIMM_NAME)
    model = models.create("timm:test_resnet", num_classes=4, pretrained=True)
    assert differing(published, model) == ["fc.bias", "fc.weight"]  # resized to 4 classes, fresh
    assert model.fc.out_features == 4
    gray = models.create(f"timm:{TIMM_NAME}", num_classes=4, in_chans=1, pretrained=True)
    assert differing(published, gray) == ["conv1.0.weight", "fc.bias", "fc.weight"]
    assert torch.equal(gray.state_dict()["conv1.0.weight"], published["conv1.0.weight"].sum(1, keepdim=True))
    assert differing(published, models.create("timm:test_resnet", num_classes=4))[:1] != []  # random otherwise


def test_timm_pretrained_file_and_local_dir(tmp_path, hub_cache):
    from safetensors.torch import save_file
    from timm.models._hub import save_for_hf

    torch.manual_seed(2)
    source = timm.create_model(TIMM_NAME, pretrained=False)
    published = source.state_dict()
    file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in published.items()}, str(file))
    pth = tmp_path / "weights.pth"
    torch.save(published, pth)
    for path in (file, pth):  # timm's pretrained_cfg_overlay=dict(file=PATH); the hub cache is empty
        assert differing(published, models.create("timm:test_resnet", num_classes=3, pretrained=str(path))) == [
            "fc.bias", "fc.weight"]
    save_for_hf(source, str(tmp_path / "folder"), safe_serialization=True)
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["config.json", "model.safetensors"]
    local = models.create(f"timm:local-dir:{tmp_path / 'folder'}", num_classes=3, pretrained=True)
    assert differing(published, local) == ["fc.bias", "fc.weight"]
    assert pretrained_preprocessing(f"timm:local-dir:{tmp_path / 'folder'}", True).image_size == 160


def test_timm_offline_miss_and_bad_names_are_one_clear_error(hub_cache):
    with pytest.raises(models.ModelSourceError) as caught:
        models.create("timm:test_resnet", num_classes=3, pretrained=True)
    text = str(caught.value)
    assert "\n" not in text
    for fragment in ("timm:test_resnet", "https://huggingface.co/timm/test_resnet.r160_in1k", str(hub_cache),
                     "pretrained=PATH", "HF_HUB_OFFLINE=1"):
        assert fragment in text, (fragment, text)
    with pytest.raises(models.ModelSourceError, match="timm:cspresnet50w has no published pretrained weights.*"
                                                      "timm:cspresnet50"):
        models.create("timm:cspresnet50w", pretrained=True)
    with pytest.raises(UnknownNameError, match="no weights tagged 'in21k'; its tags: timm:test_resnet.r160"):
        models.create("timm:test_resnet.in21k", pretrained=True)
    with pytest.raises(models.ModelSourceError, match="no such file"):
        models.create("timm:test_resnet", pretrained="/nonexistent/weights.safetensors")


def test_torchvision_enum_reads_the_torch_hub_cache(torch_home):
    import torchvision

    torch.manual_seed(3)
    published = torchvision.models.squeezenet1_1().state_dict()
    torch.save(published, torch_home / TV_FILE)  # no hash check on a file already cached
    for pretrained in (True, "DEFAULT", "IMAGENET1K_V1", "SqueezeNet1_1_Weights.IMAGENET1K_V1"):
        model = models.create("torchvision:squeezenet1_1", num_classes=4, pretrained=pretrained)
        assert differing(published, model) == ["classifier.1.bias", "classifier.1.weight"]
        assert model.classifier[1].out_channels == 4
    gray = models.create("torchvision:squeezenet1_1", num_classes=4, in_chans=1, pretrained=True)
    assert differing(published, gray) == ["classifier.1.bias", "classifier.1.weight", "features.0.weight"]
    assert torch.equal(gray.features[0].weight, published["features.0.weight"].sum(1, keepdim=True))
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 4)
    assert pretrained_preprocessing("torchvision:squeezenet1_1", True).mean == (0.485, 0.456, 0.406)


def test_adapt_input_conv_matches_timm():
    from timm.models._manipulate import adapt_input_conv as timm_adapt

    weight = torch.randn(8, 3, 3, 3)
    for channels in (1, 2, 3, 4, 7):
        assert torch.allclose(adapt_input_conv(channels, weight), timm_adapt(channels, weight.clone()))


class Payload:
    """Unpickling this creates `marker`: what a malicious weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_torchvision_cache_holding_a_pickle_payload_is_refused_and_nothing_runs(tmp_path, torch_home):
    marker = tmp_path / "ran"
    with open(torch_home / TV_FILE, "wb") as handle:
        pickle.dump({"features.0.weight": Payload(marker)}, handle, protocol=2)
    with pytest.raises(models.ModelSourceError, match=f"{TV_FILE} do not load.*refused unread.*delete that file"):
        models.create("torchvision:squeezenet1_1", num_classes=4, pretrained=True)
    assert not marker.exists()


def test_torchvision_offline_miss_and_bad_enum_names(torch_home, monkeypatch):
    import urllib.error

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(models.ModelSourceError) as caught:
        models.create("torchvision:squeezenet1_1", num_classes=4, pretrained=True)
    text = str(caught.value)
    for fragment in ("SqueezeNet1_1_Weights.IMAGENET1K_V1", "https://download.pytorch.org/models/" + TV_FILE,
                     str(torch_home / TV_FILE), "Name or service not known"):
        assert fragment in text, (fragment, text)
    with pytest.raises(models.ModelSourceError, match="no weights 'IMAGENET_V1'. Did you mean IMAGENET1K_V1"):
        models.create("torchvision:squeezenet1_1", pretrained="IMAGENET_V1")
    assert not list(torch_home.iterdir())


def write_folder(root: Path, classes: int = 2, per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(classes):
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                (root / split / f"c{label}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / split / f"c{label}" / f"{i}.png")


QUICK = ["log.progress=false", "log.tensorboard=false", "data.batch_size=4", "optim.epochs=1",
         "optim.milestones=[]", "dataset=folder"]


def test_train_a_pretrained_timm_student_records_its_preprocessing(tmp_path, hub_cache):
    published = hub_cache_weights(hub_cache, TIMM_NAME)
    write_folder(tmp_path / "imgs")
    common = [*QUICK, f"data.root={tmp_path / 'imgs'}", f"out_dir={tmp_path / 'runs'}",
              "model.name=timm:test_resnet", "model.pretrained=true"]
    assert main(["train", *common, "name=pre"]) == 0
    log = (tmp_path / "runs" / "pre" / "log.txt").read_text()
    assert ("preprocessing from the timm pretrained_cfg of timm:test_resnet: data.mean=[0.5, 0.5, 0.5] "
            "data.std=[0.5, 0.5, 0.5] data.image_size=160") in log
    saved = yaml.safe_load((tmp_path / "runs" / "pre" / "config.yaml").read_text())
    assert saved["data"]["mean"] == [0.5] * 3 and saved["data"]["std"] == [0.5] * 3
    assert saved["data"]["image_size"] == 160  # the weights' input size, as the dataset resized to it
    checkpoint = torch.load(tmp_path / "runs" / "pre" / "last.pth", weights_only=True)
    assert checkpoint["config"]["data"]["mean"] == [0.5] * 3
    # The user's own values win and are recorded; the images follow them.
    assert main(["train", *common, "name=own", "data.mean=[0.4,0.4,0.4]", "data.image_size=32"]) == 0
    saved = yaml.safe_load((tmp_path / "runs" / "own" / "config.yaml").read_text())
    assert saved["data"]["mean"] == [0.4] * 3 and saved["data"]["std"] == [0.5] * 3
    assert saved["data"]["image_size"] == 32
    from adakd.engine.config import resolve
    from adakd.engine.trainer import Trainer

    config = resolve(None, [tmp_path / "runs" / "own" / "config.yaml"], [f"out_dir={tmp_path / 'again'}"])
    trainer = Trainer(config)
    assert trainer.train_set.mean == (0.4,) * 3 and trainer.train_set.std == (0.5,) * 3
    assert trainer.input_shape == (3, 32, 32)
    assert differing(published, trainer.student.model) == ["fc.bias", "fc.weight"]  # before any step
    shutil.rmtree(hub_cache / f"models--timm--{TIMM_NAME}")  # eval reads the run's weights only
    assert main(["eval", str(tmp_path / "runs" / "pre")]) == 0
    # So does a resume: the student comes from last.pth, the published weights are not looked for again.
    assert main(["train", "--resume", str(tmp_path / "runs" / "pre"), "optim.epochs=2"]) == 0
    assert torch.load(tmp_path / "runs" / "pre" / "last.pth", weights_only=True)["epoch"] == 2




def test_bad_pretrained_input_is_one_line_and_creates_nothing(tmp_path, hub_cache, torch_home, capsys):
    runs = tmp_path / "runs"
    fast = ["train", "--preset", "demo", "data.image_size=8", "data.train_size=32", "log.progress=false",
            "log.tensorboard=false", "optim.epochs=1", "optim.milestones=[]", f"out_dir={runs}", "name=bad"]
    fails(capsys, [*fast, "model.name=timm:test_resnet", "model.pretrained=true"],
          "model.pretrained=PATH", "https://huggingface.co/timm/test_resnet.r160_in1k", str(hub_cache))
    fails(capsys, [*fast, "model.name=timm:cspresnet50w", "model.pretrained=true"],
          "timm:cspresnet50w has no published pretrained weights", "timm:cspresnet50", "model.pretrained=PATH")
    fails(capsys, [*fast, "model.name=timm:test_resnet", "model.pretrained=/no/such.safetensors"],
          "model.pretrained='/no/such.safetensors'", "no such file")
    fails(capsys, [*fast, "model.name=torchvision:squeezenet1_1", "model.pretrained=IMAGENET_V1"],
          "no weights 'IMAGENET_V1'", "Did you mean IMAGENET1K_V1")
    fails(capsys, [*fast, "model.name=timm:test_resnet", "model.pretrained=true", f"model.weights={tmp_path}/w.pth"],
          "model.pretrained and model.weights are both given: give one")
    fails(capsys, [*fast, "data.std=[0.2,0,0.2]"], "data.std must be", "> 0", "got [0.2, 0.0, 0.2]")
    fails(capsys, [*fast, "data.mean=[0.5]"], "data.mean has 1 values, but digits has 3 channel(s); give 3")
    assert not runs.exists()


def test_whose_preprocessing_the_pipeline_takes():
    """The student's weights drive the pipeline, else the teacher's; a grayscale set averages the channels; the
    user's values win. Only the weights' configs are read: nothing is downloaded or built."""
    from adakd.engine.config import resolve
    from adakd.engine.preprocessing import with_pretrained_preprocessing

    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    both = resolve(None, None, ["task=distill", "dataset=digits", "model.name=timm:test_resnet",
                                "model.pretrained=true", "teacher.name=torchvision:squeezenet1_1",
                                "teacher.pretrained=IMAGENET1K_V1"])
    config, notes = with_pretrained_preprocessing(both)
    assert (config.data.mean, config.data.std, config.data.image_size) == ((0.5,) * 3, (0.5,) * 3, 160)
    assert any("the teacher's weights expect mean [0.485, 0.456, 0.406]" in n and "follows the student's" in n
               for n in notes), notes
    teacher_only = resolve(None, None, ["task=distill", "dataset=cifar100", "model.name=resnet8",
                                        "teacher.name=torchvision:squeezenet1_1", "teacher.pretrained=true"])
    config, notes = with_pretrained_preprocessing(teacher_only)
    assert (config.data.mean, config.data.std) == imagenet
    assert config.data.image_size is None  # cifar100's loader has one size
    gray, _ = with_pretrained_preprocessing(resolve(None, None, [
        "dataset=mnist", "model.name=torchvision:squeezenet1_1", "model.pretrained=true", "data.std=[0.3]"]))
    assert gray.data.mean == pytest.approx((sum(imagenet[0]) / 3,)) and gray.data.std == (0.3,)
    assert gray.data.image_size == 224
    plain = resolve(None, None, ["dataset=digits", "model.name=timm:test_resnet"])
    assert with_pretrained_preprocessing(plain) == (plain, [])
