"""Checkpoints written by other tools: DDP's `module.` prefix, timm / Lightning {'state_dict': ...}, run folders."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adakd import models
from adakd.models.checkpoint import CheckpointError, load_weights


def source(seed: int = 0, name: str = "resnet8") -> dict[str, torch.Tensor]:
    """The state_dict of a freshly initialised zoo model (distinct per seed, so a copy is told from a fresh init)."""
    torch.manual_seed(seed)
    return models.create(name, num_classes=10).state_dict()


def assert_loaded_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def fresh() -> torch.nn.Module:
    torch.manual_seed(123)  # differs from every `source` seed, so nothing fits before loading
    return models.create("resnet8", num_classes=10)


def test_ddp_prefixed_state_dict_loads_into_the_plain_model(tmp_path: Path) -> None:
    state = source(1)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    model = fresh()
    assert not torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])
    load_weights(model, tmp_path / "ddp.pth")
    assert_loaded_exactly(model, state)


@pytest.mark.parametrize("wrapper, prefix", [("state_dict", "model."), ("state_dict", "student."),
                                             ("state_dict", "model.module."), ("model_state_dict", ""),
                                             ("state_dict", "")])
def test_wrapped_and_prefixed_state_dict_loads(tmp_path: Path, wrapper: str, prefix: str) -> None:
    state = source(2)
    path = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 7, "global_step": 70, wrapper: {prefix + k: v for k, v in state.items()}}, path)
    model = load_weights(fresh(), path)
    assert_loaded_exactly(model, state)


def test_run_folder_loads_its_last_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "my_teacher"
    run.mkdir()
    state = source(3)
    torch.save({"epoch": 1, "model": state}, run / "last.pth")
    torch.save({"epoch": 1, "model": source(4)}, run / "best.pth")  # the folder means last.pth, not best.pth
    assert_loaded_exactly(load_weights(fresh(), run), state)


def test_folder_without_last_checkpoint_names_the_folder(tmp_path: Path) -> None:
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(CheckpointError) as info:
        load_weights(fresh(), run)
    message = str(info.value)
    assert f"{str(run)!r} is a folder without last.pth" in message
    assert "give a checkpoint file" in message and "does not exist" not in message


def test_wrongly_shaped_prefixed_state_still_raises_the_mismatch(tmp_path: Path) -> None:
    state = source(5)
    state["fc.weight"] = torch.zeros(7, state["fc.weight"].shape[1])  # a 7-class head for a 10-class model
    path = tmp_path / "wrong.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(model, path, model_name="resnet8")
    message = str(info.value)
    assert message.startswith(f"checkpoint {str(path)!r} does not fit model 'resnet8' (missing keys: conv1.weight")
    assert "unexpected keys: model.conv1.weight" in message  # the mismatch of the state as found
    assert "read its 'state_dict' entry, tried the keys as found, without 'model.')" in message
    assert_loaded_exactly(model, before)  # nothing was half-loaded


def test_architecture_mismatch_without_wrapper_or_prefix_lists_what_was_tried(tmp_path: Path) -> None:
    path = tmp_path / "vgg8.pth"
    torch.save(source(6, "vgg8"), path)
    with pytest.raises(CheckpointError) as info:
        load_weights(fresh(), path)
    message = str(info.value)
    assert "does not fit model (" in message
    assert "read the top level (no 'model', 'state_dict', 'model_state_dict' entry), tried the keys as found)" \
        in message
