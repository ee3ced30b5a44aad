"""The data pipeline's normalisation and input size when a model starts from published weights.

Each of data.mean, data.std and data.image_size that the user left null takes the value the pretrained weights were
trained with: the student's (model.pretrained), else the teacher's (teacher.pretrained), else the dataset's own.
The values are written into the run's config, so config.yaml records them and a resume or `adakd eval` reads them
back as they were. Images are resized bilinearly whatever the weights' interpolation (a note says when they differ).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from adakd import data as datasets
from adakd.engine.config import ConfigError, ModelConfig, RunConfig
from adakd.models.external import ModelSourceError, Preprocessing, pretrained_preprocessing, with_config_key


def _numbers(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def takes_image_size(dataset: str) -> bool:
    """Whether the dataset's loader can resize its images (cifar100, tiny-imagenet and imagenet have fixed sizes)."""
    load = datasets._module(dataset).load  # the loader itself: dataset_info reports a fixed size for either kind
    try:
        return "image_size" in inspect.signature(load).parameters
    except (TypeError, ValueError):
        return False


def with_pretrained_preprocessing(config: RunConfig) -> tuple[RunConfig, list[str]]:
    """`config` with the pretrained weights' mean, std and input size filled in where data.* are null, and the
    lines that say what was taken (none when no model is pretrained)."""
    student = _preprocessing("model", config.model) if config.model.name else None
    teacher = _preprocessing("teacher", config.teacher) if config.task == "distill" and config.teacher.name else None
    chosen = student or teacher
    if chosen is None:
        return config, []
    channels = datasets.dataset_info(config.data.name).get("channels") or 3
    mean, std = chosen.mean, chosen.std
    if channels == 1 and len(mean) > 1:
        # A grayscale set: the first convolution's RGB filters are summed (adapt_input_conv), so one gray value
        # stands for all three channels; its statistics are the channels' averages.
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    updates: dict[str, Any] = {}
    if config.data.mean is None:
        updates["mean"] = tuple(mean)
    if config.data.std is None:
        updates["std"] = tuple(std)
    if config.data.image_size is None and takes_image_size(config.data.name):
        updates["image_size"] = chosen.image_size
    notes = []
    if updates:
        given = " ".join(f"data.{key}={_numbers(value) if isinstance(value, tuple) else value}"
                         for key, value in updates.items())
        notes.append(f"preprocessing from the {chosen.source}: {given} (set these keys to choose others)")
    if chosen.interpolation != "bilinear":
        notes.append(f"the {chosen.source} was trained on {chosen.interpolation}-resized images; adakd resizes "
                     "bilinearly")
    if student is not None and teacher is not None and _differs(student, teacher):
        notes.append(f"the teacher's weights expect mean {_numbers(teacher.mean)}, std {_numbers(teacher.std)}, "
                     f"size {teacher.image_size}; the data pipeline follows the student's (model.pretrained)")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **updates)), notes


def _preprocessing(key: str, spec: ModelConfig) -> Preprocessing | None:
    try:
        return pretrained_preprocessing(spec.name, spec.pretrained)
    except ModelSourceError as err:
        raise with_config_key(err, key) from None


def _differs(a: Preprocessing, b: Preprocessing) -> bool:
    return (a.mean, a.std, a.image_size) != (b.mean, b.std, b.image_size)


def with_normalisation(dataset: Any, mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                       name: str) -> Any:
    """`dataset` normalised with data.mean / data.std where given (the dataset's own statistics otherwise)."""
    if mean is None and std is None:
        return dataset
    if not isinstance(dataset, (datasets.ArrayDataset, datasets.FolderDataset)):
        raise ConfigError(f"data.mean / data.std apply to adakd's datasets and folders; {name} normalises its own "
                          "images, so remove them")
    mean, std = tuple(mean or dataset.mean), tuple(std or dataset.std)
    channels = len(dataset.mean)
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise ConfigError(f"data.{key} has {len(values)} values, but {name} has {channels} channel(s); give "
                              f"{channels}")
    if isinstance(dataset, datasets.ArrayDataset):
        return datasets.ArrayDataset(dataset.images, dataset.targets, classes=dataset.classes, mean=mean, std=std,
                                     augment=dataset.augment, crop_padding=dataset.crop_padding, ids=dataset.ids)
    from torchvision import transforms

    steps = getattr(getattr(dataset.folder, "transform", None), "transforms", [])
    normalise = [step for step in steps if isinstance(step, transforms.Normalize)]
    if not normalise:
        raise ConfigError(f"data.mean / data.std: {name}'s images are not normalised by adakd; remove them")
    normalise[-1].mean, normalise[-1].std = list(mean), list(std)
    dataset.mean, dataset.std = mean, std
    return dataset
