"""Helpers shared by the tests of the command line and of offline caches.

`from cli_checks import fails, snapshot, hub_cache_weights` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

from pathlib import Path

import torch

from adakd.cli import main


def fails(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI; assert exit 2, exactly one 'adakd: error:' line holding every fragment, no traceback."""
    capsys.readouterr()  # only this command's output counts
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("adakd: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to prove a failed command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hub_cache_weights(cache: Path, name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights of timm model `name` (a tag, or its default one), written where huggingface_hub looks for them
    in the hub cache `cache` (models--<org>--<repo>/snapshots/<rev>/model.safetensors and refs/main)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    repo = cache / ("models--" + model.pretrained_cfg["hf_hub_id"].replace("/", "--"))
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return state
