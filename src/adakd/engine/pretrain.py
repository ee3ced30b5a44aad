"""The optional pre-training stage a distiller may declare (FT's paraphraser), run before distillation."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from adakd.distillers.base import Distiller
from adakd.ranks import all_reduce_sum, average_gradients
from adakd.models.staged import StagedModel
from adakd.strategies.base import Precision


def freeze_pretrain_parts(distiller: Distiller) -> None:
    """Pre-trained parts never learn during distillation (and DDP must not expect gradients for them)."""
    for param in distiller.pretrain_parameters():
        param.requires_grad_(False)


def pretrain(
    distiller: Distiller,
    teacher: StagedModel,
    teacher_spots: list[int],
    loader,
    precision: Precision,
    progress: bool = True,
) -> list[float]:
    """SGD (momentum 0.9, wd 5e-4, constant lr) on `distiller.pretrain_loss`; returns the mean loss per epoch."""
    params = distiller.pretrain_parameters()
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=distiller.pretrain_lr, momentum=0.9, weight_decay=5e-4)
    distiller.train(True)
    history = []
    for epoch in range(1, distiller.pretrain_epochs + 1):
        loader.set_epoch(epoch)
        total = torch.zeros(2, dtype=torch.float64, device=params[0].device)
        for images, _, _ in tqdm(loader, desc=f"pretrain {epoch}", leave=False, disable=not progress):
            with precision.autocast():
                output = teacher(images)
                loss = distiller.pretrain_loss([output.features[k] for k in teacher_spots])
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            average_gradients(params)  # the distiller is not inside DDP here (one flat all-reduce; none when alone)
            precision.step(optimizer)
            total += torch.stack([loss.detach().double() * images.shape[0],
                                  torch.tensor(float(images.shape[0]), dtype=torch.float64, device=total.device)])
        loss_sum, count = all_reduce_sum(total).tolist()
        history.append(loss_sum / count)
    freeze_pretrain_parts(distiller)
    return history
