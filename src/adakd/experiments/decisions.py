"""`adakd decisions`: which training samples a trained SAKD policy does not distill (the paper's Fig. 5)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from adakd import data as datasets
from adakd.engine.config import ConfigError
from adakd.engine.runs import write_text_atomic
from adakd.engine.trainer import Trainer


def export_decisions(run_dir: str | Path, spot: str, batch_size: int = 256) -> tuple[Path, list[int], str]:
    """Run the run's policy over the training set (fixed order, no augmentation, seeded Gumbel sampling).

    Writes RUN_DIR/decisions.csv (dataset index, label, per-spot decision d and distil probability p) and returns
    (that path, the dataset indices NOT distilled at `spot`, the spot's name). Batching does not change a decision:
    the policy sees one sample's pooled features and draws its own noise.
    """
    trainer = Trainer.resume(run_dir)
    strategy = trainer.strategy
    if not strategy.decision_names():
        raise ConfigError(f"strategy {trainer.config.strategy.name!r} makes no per-sample decisions; "
                          "`adakd decisions` reads runs of an adaptive strategy such as sakd")
    names = strategy.decision_names()
    key = names[int(spot)] if spot.isdigit() and int(spot) < len(names) else spot
    if key not in names:
        raise ConfigError(f"--spot {spot!r} is not a decision of this run; choose an index 0..{len(names) - 1} "
                          f"or a name: {', '.join(names)}")
    loader = datasets.make_loader(trainer.train_set, batch_size, train=False, device=trainer.dist.device,
                                  num_workers=trainer.config.data.num_workers)
    torch.manual_seed(trainer.config.seed)
    strategy.train(False)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "label", *(f"d/{n}" for n in names), *(f"p/{n}" for n in names)])
    column = names.index(key)
    skipped: list[int] = []
    with torch.no_grad():
        for images, targets, indices in loader:
            decisions, probs = strategy.decide(images)
            for i, label, d, p in zip(indices.tolist(), targets.tolist(), decisions.tolist(), probs.tolist()):
                writer.writerow([i, label, *(int(v > 0.5) for v in d), *(f"{v:.6f}" for v in p)])
                if d[column] <= 0.5:
                    skipped.append(i)
    path = Path(run_dir) / "decisions.csv"
    write_text_atomic(path, buffer.getvalue())
    return path, skipped, key
