"""`adakd teachers verify`: each fetched published teacher scored on its dataset's test split, beside the top-1 its
publisher reports."""
from __future__ import annotations

import os
from typing import Callable

from adakd import data, models
from adakd.data import DatasetError
from adakd.engine.config import ConfigError, preset_names, resolve
from adakd.engine.distributed import pick_device
from adakd.engine.loop import evaluate
from adakd.engine.build import load_data
from adakd.models.teachers import PUBLISHED, PublishedTeacher, TeacherError, find, get, published_top1, teachers_dir


def verify(names: list[str], overrides: list[str], directory: str | os.PathLike | None = None,
           say: Callable[[str], None] = print) -> list[dict]:
    """Score the named (default: every fetched) published teacher on its test split; one line each through `say`.

    A file changed since its fetch is refused before anything is scored. Without names, a teacher whose test split
    is not on this machine (ImageNet) is skipped with a note; a named one is an error.
    """
    explicit = bool(names)
    chosen = [get(name) for name in dict.fromkeys(names)] if explicit else list(PUBLISHED.values())
    present: list[tuple[PublishedTeacher, os.PathLike]] = []
    for teacher in chosen:
        path = find(teacher, directory)  # raises on a changed file: nothing is scored from it
        if path is not None:
            present.append((teacher, path))
        elif explicit:
            raise TeacherError(f"teacher {teacher.name} is not fetched (looked in "
                               f"{teachers_dir(directory)}); run `adakd teachers fetch {teacher.name}` first")
    if not present:
        raise TeacherError(f"no published teacher is fetched (looked in {teachers_dir(directory)}); run `adakd "
                           "teachers fetch NAME` or `adakd teachers fetch --all` first")
    results = []
    for dataset in dict.fromkeys(teacher.dataset for teacher, _ in present):
        try:
            config = resolve([dataset] if dataset in preset_names() else [], None,
                             [f"data.name={dataset}", *overrides])
            test_set = load_data(config, "test")
        except DatasetError as err:
            if explicit:
                raise
            skipped = ", ".join(t.name for t, _ in present if t.dataset == dataset)
            say(f"skipped {skipped}: the {dataset} test split is not here ({str(err).splitlines()[0]})")
            continue
        device = pick_device(config.device)
        loader = data.make_loader(test_set, config.data.test_batch_size, train=False, device=device,
                                  num_workers=config.data.num_workers)
        for teacher, path in present:
            if teacher.dataset != dataset:
                continue
            if test_set.num_classes != teacher.num_classes:
                raise ConfigError(f"{teacher.name} predicts {teacher.num_classes} classes, the {dataset} test split "
                                  f"given has {test_set.num_classes}; check data.root")
            model = models.create(teacher.name, num_classes=teacher.num_classes)
            models.load_weights(model, path, model_name=teacher.name)
            top1 = evaluate(model.to(device), loader)["acc1"]
            published = published_top1(teacher)
            versus = (f"published {published:.2f}%  difference {top1 - published:+.2f}" if published is not None
                      else "published: unknown")
            say(f"{teacher.name:<11} {dataset} test ({len(test_set)} images): top-1 {top1:.2f}%  {versus}  ({path})")
            results.append({"name": teacher.name, "dataset": dataset, "top1": top1, "published": published,
                            "path": str(path)})
    return results
