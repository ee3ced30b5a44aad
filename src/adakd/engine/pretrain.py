"""The optional pre-training stage a distiller may declare, run before distillation: FT's paraphraser on teacher
features; AB's and FSP's initialisation, which also trains the student (`Distiller.pretrain_trains_student`)."""
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
    student: StagedModel | None = None,
    student_spots: list[int] | None = None,
    run_lr: float | None = None,
) -> list[float]:
    """SGD (momentum 0.9, wd 5e-4; lr x0.1 after each of `pretrain_milestones`) on `distiller.pretrain_loss`;
    returns the mean loss per epoch.

    A distiller with `pretrain_trains_student` also gets the student's features at `student_spots` and trains the
    student's parameters (the unwrapped staged view: gradients averaged here, as for the distiller's own); its
    `pretrain_lr` None means `run_lr`, the run's learning rate.
    """
    params = distiller.pretrain_parameters()
    for param in params:
        param.requires_grad_(True)
    trains_student = distiller.pretrain_trains_student
    if trains_student:
        if student is None or student_spots is None:
            raise ValueError(f"{distiller.name}'s pre-training trains the student: pass student and student_spots")
        params = params + [p for p in student.parameters() if p.requires_grad]
        student.train(True)
    lr = distiller.pretrain_lr if distiller.pretrain_lr is not None else run_lr
    if lr is None:
        raise ValueError(f"{distiller.name}'s pre-training runs at the run's learning rate: pass run_lr")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    distiller.train(True)
    history = []
    for epoch in range(1, distiller.pretrain_epochs + 1):
        loader.set_epoch(epoch)
        drops = sum(epoch > milestone for milestone in distiller.pretrain_milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.1 ** drops
        total = torch.zeros(2, dtype=torch.float64, device=params[0].device)
        for images, _, _ in tqdm(loader, desc=f"pretrain {epoch}", leave=False, disable=not progress):
            with precision.autocast():
                if trains_student:
                    loss = distiller.pretrain_loss(
                        spot_features(teacher, images, teacher_spots, distiller.teacher_preact),
                        spot_features(student, images, student_spots, distiller.student_preact))
                else:
                    output = teacher(images)
                    loss = distiller.pretrain_loss([output.features[k] for k in teacher_spots])
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            average_gradients(params)  # neither is inside DDP here (one flat all-reduce; none when alone)
            precision.step(optimizer)
            total += torch.stack([loss.detach().double() * images.shape[0],
                                  torch.tensor(float(images.shape[0]), dtype=torch.float64, device=total.device)])
        loss_sum, count = all_reduce_sum(total).tolist()
        history.append(loss_sum / count)
    freeze_pretrain_parts(distiller)
    return history


def spot_features(network: StagedModel, images: torch.Tensor, spots: list[int], preact: bool) -> list[torch.Tensor]:
    """The features (or pre-activations) of `network` at `spots`, running its stages only up to the deepest one."""
    output = network(images, end=max(spots), preact=preact)
    source = output.preacts if preact else output.features
    return [source[k] for k in spots]
