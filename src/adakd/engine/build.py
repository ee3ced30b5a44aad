"""Build what one run is made of from its config: data, student, teacher, distiller, strategy (`build_run`).

Training, `adakd eval`, `adakd export` and the benchmarks build through here, so a network is built one way only.
The order of building is the order of random draws: changing it changes every seeded run and breaks exact resume.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from adakd import data as datasets
from adakd import distillers, models, strategies
from adakd.data.split import stratified_split, subset
from adakd.distillers.base import DistillContext
from adakd.engine import distributed
from adakd.engine.config import ConfigError, RunConfig
from adakd.engine.distributed import DistInfo
from adakd.engine.preprocessing import with_normalisation
from adakd.engine.pretrain import freeze_pretrain_parts
from adakd.models.external import ModelSourceError, split_source, with_config_key
from adakd.models.layers import with_input_channels
from adakd.options import OptionsError
from adakd.registry import UnknownNameError
from adakd.strategies.components import build_components
from adakd.strategies.base import LossWeights, OptionError, RunFacts, Strategy

# What build_run can build; a run that trains needs them all, `adakd eval` only the test split and the student.
PARTS = ("train", "test", "student", "teacher", "distiller", "strategy")


@dataclass
class Run:
    """What one run is made of, as `build_run` built it (a part not asked for is None)."""

    config: RunConfig
    num_classes: int
    input_shape: tuple[int, ...]  # one image, channels first
    # The whole training set's targets, before any held-out split (CRD's memory rows, the run's length).
    train_targets: torch.Tensor | None = None
    train_set: Any = None  # without the held-out part
    test_set: Any = None
    val_set: Any = None  # the held-out part, for a strategy that learns on one
    split: dict[str, Any] | None = None  # what split.json records of it
    batch: int | None = None  # per process: data.batch_size / world size
    student: models.StagedModel | None = None
    teacher: models.StagedModel | None = None
    teacher_is_trained: bool = False  # False for a teacher the strategy redraws at random
    distiller: nn.Module | None = None
    student_spots: list[int] = field(default_factory=list)
    teacher_spots: list[int] = field(default_factory=list)
    strategy: Strategy | None = None
    # Decisions taken while building, said once when the run starts (e.g. stages paired by size).
    notes: list[str] = field(default_factory=list)


def load_data(config: RunConfig, split: str):
    """The dataset of a split, optionally cut to the first `data.train_size` training samples."""
    options: dict[str, Any] = {}
    if config.data.image_size is not None:
        options["image_size"] = config.data.image_size
    if config.data.name == "tiny-imagenet":
        options["tiny_aug"] = config.data.tiny_aug
    if config.data.in_memory is not None:
        options["in_memory"] = config.data.in_memory
    try:
        dataset = datasets.load_dataset(config.data.name, split, root=config.data.root,
                                        download=config.data.download, mirror=config.data.mirror, **options)
    except TypeError as err:  # an option the dataset does not take
        if "in_memory" not in str(err):
            raise
        raise ConfigError(f"data.in_memory applies to folder datasets, not {config.data.name}; remove it") from None
    except (MemoryError, RuntimeError) as err:  # torch's allocator refuses a set resized beyond the machine's memory
        if config.data.image_size is None or not isinstance(err, MemoryError) and "alloc" not in str(err):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"data.image_size={config.data.image_size}: the {split} split of {config.data.name} at "
                          f"that size does not fit in memory ({reason[:160]}); lower data.image_size") from None
    dataset = with_normalisation(dataset, config.data.mean, config.data.std, config.data.name)
    size = config.data.train_size
    if split == "train" and size is not None:
        if not isinstance(dataset, datasets.ArrayDataset):
            raise ConfigError(f"data.train_size works only for datasets held in memory, and {config.data.name} "
                              "streams from disk here; for a folder set give data.in_memory=true, or remove "
                              "data.train_size")
        dataset = datasets.ArrayDataset(
            dataset.images[:size], dataset.targets[:size], classes=dataset.classes, mean=dataset.mean,
            std=dataset.std, augment=dataset.augment, crop_padding=dataset.crop_padding)
    if split == "train" and config.data.views != 1 and not isinstance(dataset, datasets.ArrayDataset):
        raise ConfigError(f"data.views={config.data.views} needs a dataset held in memory (the strong view is "
                          f"augmented in batches on the device), and {config.data.name} streams from disk here; for "
                          "a folder set give data.in_memory=true, or set data.views=1")
    return dataset


def teacher_candidate(name: str, num_classes: int | None = None) -> Path | None:
    """The teacher file used when teacher.weights is not given: <dir>/<name>_vanilla/ckpt_epoch_240.pth (the CRD
    benchmark's layout) under $ADAKD_TEACHERS or where `adakd teachers fetch` puts it, or a fetched torchvision
    teacher; None when there is none. A fetched file changed since its fetch raises (models.teachers.TeacherError)."""
    from adakd.models.teachers import candidate

    return candidate(name, num_classes)


def teacher_fetch_hint(name: str, num_classes: int | None = None) -> str:
    """', or fetch the published one with `adakd teachers fetch NAME`' when NAME is a published teacher of
    `num_classes` classes ('' otherwise)."""
    from adakd.models.teachers import fetch_hint

    return fetch_hint(name, num_classes)


def build_model(spec, num_classes: int, role: str, needs_weights: bool = True, in_chans: int = 3,
                on_note: Callable[[str], None] | None = None) -> torch.nn.Module:
    """Create a model for `in_chans`-channel images (from published weights with spec.pretrained) and load its
    weights strictly if a path is given; `on_note`
    gets the line saying which entry of a weights file was taken or that its classifier was left fresh."""
    kwargs = {"width_mult": spec.width_mult} if spec.width_mult is not None else {}
    kwargs.update(spec.args)
    key = "teacher" if role == "teacher" else "model"
    channels = spec.in_chans or in_chans
    external = split_source(spec.name)[0] is not None  # timm / torchvision build for any channel count themselves
    if external:
        kwargs["in_chans"] = channels
        if spec.pretrained is not False:  # published weights, classifier resized, first convolution adapted
            kwargs["pretrained"] = spec.pretrained
    try:
        model = models.create(spec.name, num_classes=num_classes, **kwargs)
    except ModelSourceError as err:
        raise with_config_key(err, key) from None
    except TypeError as err:
        if spec.width_mult is None and not spec.args:
            raise
        if not spec.args:
            raise ConfigError(f"{key}.width_mult: {spec.name!r} has no width multiplier ({err}); remove "
                              f"{key}.width_mult or pick a model that has one") from None
        raise ConfigError(f"{key}.args: {spec.name!r} does not take {', '.join(spec.args)} ({err}); remove them or "
                          "pick a model that has them") from None
    if not external:
        try:
            model = with_input_channels(model, channels)
        except ValueError as err:
            raise ConfigError(f"{key}.in_chans={channels}: {err}; give {key}.in_chans=3 with a 3-channel "
                              "dataset") from None
    weights = spec.weights
    if not weights and role == "teacher":
        found = teacher_candidate(spec.name, num_classes)
        weights = str(found) if found is not None else weights
    if weights:
        models.load_weights(model, weights, model_name=spec.name, weights_key=spec.weights_key,
                            reset_classifier=spec.reset_classifier, config_key=key, on_note=on_note)
    elif role == "teacher" and needs_weights and spec.pretrained is False:
        raise ConfigError(f"teacher.weights is required: a randomly initialised teacher {spec.name!r} teaches "
                          "nothing. Train one with `adakd train model.name=...` and pass its best.pth or last.pth, "
                          "or set ADAKD_TEACHERS to a folder laid out as <name>_vanilla/ckpt_epoch_240.pth"
                          f"{teacher_fetch_hint(spec.name, num_classes)}")
    return model


def build_distiller(config: RunConfig, student, teacher, input_shape, train_targets: torch.Tensor,
                    on_pairing: Callable[[str], None] | None = None):
    """The distiller for `distill.method`, built from feature shapes measured on both networks; `on_pairing` gets
    the line saying how stages were paired when the two networks have different numbers of stages."""
    # distill.temperature belongs to the optional KL term; a method's own temperature (KD's T, CRD's NCE
    # temperature) is one of its args.
    args = dict(config.distill.for_method().args)
    context = DistillContext(num_classes=int(train_targets.max()) + 1 if len(train_targets) else 0,
                             train_targets=train_targets, views=config.data.views)
    try:
        return distillers.create(config.distill.method, student, teacher, input_shape, config.distill.spots,
                                 context, on_pairing=on_pairing, **args)
    except OptionsError as err:  # a distill.args key or value: the error names it, whatever the pair
        raise ConfigError(str(err)) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{config.distill.method} cannot distill {config.teacher.name} -> {config.model.name}: "
                          f"{err}") from None


def check_names(config: RunConfig) -> None:
    """Unknown model, teacher, distiller, strategy or dataset names fail at once, with suggestions."""
    models.registry.check_name(config.model.name)
    if config.task == "distill":
        models.registry.check_name(config.teacher.name)
        distillers.get(config.distill.method)
    strategies.get(config.strategy.name)
    datasets.dataset_info(config.data.name)
    try:  # names and options of the components, and whether the strategy takes them, before any data is read
        refusals = [strategies.get(config.strategy.name).component_refusal(type(component))
                    for component in build_components(config.components)]
    except OptionsError as err:
        raise ConfigError(str(err)) from None
    if any(refusals):
        raise ConfigError(f"components: {next(r for r in refusals if r)}")




def hold_out(train_set, fraction: float, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """(training part, held-out part, what split.json records) of the training set, stratified by class, for a
    strategy that learns on a held-out part (§6.1)."""
    try:
        train_idx, held_idx = stratified_split(torch.as_tensor(train_set.targets), fraction, seed)
    except ValueError as err:
        raise ConfigError(f"strategy.args: the held-out split: {err}") from None
    split = {"fraction": fraction, "seed": seed, "train": train_idx.tolist(), "held_out": held_idx.tolist()}
    return subset(train_set, train_idx), subset(train_set, held_idx), split


def run_facts(config: RunConfig, input_shape: tuple[int, ...], num_classes: int,
              train_targets: torch.Tensor | None) -> RunFacts:
    """What the data says of the run, for the strategy's options: the steps of optim.epochs over the whole training
    set (before any held-out split) when its targets are known."""
    steps = (config.optim.epochs * math.ceil(len(train_targets) / config.data.batch_size)
             if train_targets is not None else None)
    return RunFacts(tuple(input_shape), num_classes, steps)


def strategy_options(config: RunConfig, facts: RunFacts) -> Any:
    """The strategy's typed options (Strategy.resolve_options); a refused value is a ConfigError naming it."""
    try:
        return strategies.get(config.strategy.name).resolve_options(dict(config.strategy.args), facts)
    except OptionError as err:
        raise ConfigError(f"strategy.args.{err.key}: {err.problem}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"strategy.args: {err}") from None


def loss_weights(config: RunConfig, distiller) -> LossWeights:
    """The loss weights of the run: the config's where given, else the distiller's defaults."""
    c = config.distill.for_method()
    if distiller is None:
        return LossWeights(ce=1.0 if c.ce_weight is None else c.ce_weight)
    d = type(distiller).defaults
    return LossWeights(ce=d.ce_weight if c.ce_weight is None else c.ce_weight,
                       method=d.method_weight if c.method_weight is None else c.method_weight,
                       kl=c.kl_weight, temperature=c.temperature, kl_standardize=c.kl_standardize)


def build_strategy(config: RunConfig, run: Run, student: nn.Module, dist: DistInfo) -> Strategy:
    """The strategy of `config` driving `student` (the staged student, or its DDP wrapper) with the run's teacher and
    distiller; under DDP, its own modules get SyncBN and the distiller's learning heads their own DDP wrapper."""
    strategy_cls = strategies.get(config.strategy.name)
    facts = run_facts(config, run.input_shape, run.num_classes, run.train_targets)
    try:
        strategy = strategy_cls(student, run.teacher, run.distiller, loss_weights(config, run.distiller),
                                run.student_spots, run.teacher_spots, facts=facts, **config.strategy.args)
    except OptionError as err:
        raise ConfigError(f"strategy.args.{err.key}: {err.problem}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"strategy.args: {err}") from None
    try:
        for component in build_components(config.components, facts):
            strategy.add_component(component)
    except OptionsError as err:
        raise ConfigError(str(err)) from None
    except (UnknownNameError, ValueError) as err:  # an unknown name; a combination a component does not define
        raise ConfigError(f"components: {err}") from None
    if config.sync_bn and dist.distributed:
        for module in strategy.owned_modules():  # heads, adapters, policies: same batch statistics
            distributed.convert_sync_batchnorm(module)
    distiller = run.distiller
    if distiller is not None and dist.distributed and any(p.requires_grad for p in distiller.parameters()):
        # The distiller's heads learn with the student, so their gradients must be averaged across ranks too.
        # No buffer broadcast: CRD keeps its memory banks equal on every rank itself, and broadcasting
        # 2 x 50,000 x 128 floats every step would cost more than the step.
        strategy.distiller_forward = distributed.wrap_student(distiller, dist, broadcast_buffers=False)
    return strategy


def build_run(config: RunConfig, parts: Sequence[str] = PARTS, *, dist: DistInfo | None = None,
              start_weights: Sequence[str] = ("student", "teacher"), num_classes: int | None = None,
              input_shape: tuple[int, ...] | None = None, train_targets: torch.Tensor | None = None) -> Run:
    """The parts of the run `config` describes, built in training's order (which is the order of random draws).

    `config` already holds its preprocessing (preprocessing.with_pretrained_preprocessing). `dist` places the
    networks on its device and wraps the student for DDP; without it they stay on the CPU as built.
    `start_weights` names the networks that read their start weights (model.weights / teacher.weights, published
    weights, a found teacher file); the others are built without any, as a resume (the student), eval and export
    do before loading a checkpoint. Without the data parts, `num_classes`, `input_shape` and (for a distiller) `train_targets` say what
    the data would. A teacher and a distiller are built only for `task=distill`.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"build_run: unknown parts {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    distill = config.task == "distill"
    place = dist is not None
    dist = dist or DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    notes: list[str] = []

    # Data: the splits, a held-out part for a strategy that learns on one, one process's share of the batch.
    train_set = test_set = val_set = split = batch = None
    if "train" in parts:
        train_set = load_data(config, "train")
    if "test" in parts:
        test_set = load_data(config, "test")
    known = train_set if train_set is not None else test_set
    if known is not None:  # before any held-out split: one read of a sample, as every seeded run has made
        num_classes, input_shape = known.num_classes, tuple(known[0][0].shape)
    if num_classes is None or input_shape is None:
        raise ValueError("build_run: without the train or test part, give num_classes and input_shape")
    strategy_cls = strategies.get(config.strategy.name)
    options: list[Any] = []  # the strategy's options, resolved once when first asked for

    def options_now() -> Any:
        if not options:
            options.append(strategy_options(config, run_facts(config, input_shape, num_classes, train_targets)))
        return options[0]

    if train_set is not None:
        train_targets = train_set.targets
        fraction = strategy_cls.validation_fraction(options_now())
        if fraction is not None:
            train_set, val_set, split = hold_out(train_set, fraction, config.seed)
        batch = config.data.batch_size // dist.world_size
        if batch * dist.world_size != config.data.batch_size:
            raise ConfigError(f"data.batch_size {config.data.batch_size} (the global batch) must be divisible by "
                              f"the {dist.world_size} processes")
    run = Run(config, num_classes, input_shape, train_targets=train_targets, train_set=train_set,
              test_set=test_set, val_set=val_set, split=split, batch=batch, notes=notes)

    # Networks: grayscale sets train 1-channel models unless model.in_chans / teacher.in_chans say otherwise.
    channels = input_shape[0]
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    if "student" in parts:
        # A resumed run's student comes from its checkpoint: its start weights (a file, or published weights that
        # may need the network) are not read again, so a resume works offline and after the file is gone.
        spec = (config.model if "student" in start_weights
                else dataclasses.replace(config.model, weights=None, pretrained=False))
        run.student = models.staged(build_model(spec, num_classes, "student", in_chans=channels,
                                                on_note=notes.append))
        if place:
            run.student.to(dist.device, memory_format=memory_format)
    if distill and "teacher" in parts:
        # A strategy that redraws the teacher's weights itself needs no file.
        scratch = "teacher" in start_weights and not strategy_cls.needs_teacher_weights(options_now())
        if "teacher" in start_weights:
            teacher = build_model(config.teacher, num_classes, "teacher", needs_weights=not scratch,
                                  in_chans=channels, on_note=notes.append)
        else:  # built as a student would be: a network of the teacher's shape that looks for no weights file
            teacher = build_model(dataclasses.replace(config.teacher, weights=None, pretrained=False), num_classes,
                                  "student", in_chans=channels)
        run.teacher = models.frozen(teacher)
        if place:
            run.teacher.to(dist.device, memory_format=memory_format)
        # A teacher redrawn at random is expected to score at chance: no warning then.
        run.teacher_is_trained = "teacher" in start_weights and not scratch
    if distill and "distiller" in parts:
        if run.student is None or run.teacher is None or train_targets is None:
            raise ValueError("build_run: the distiller needs the student, the teacher and the train part (or "
                             "train_targets)")
        # The full training set's targets: a held-out split keeps dataset indices, so CRD's rows cover both parts.
        run.distiller, run.student_spots, run.teacher_spots = build_distiller(
            config, run.student, run.teacher, input_shape, train_targets, on_pairing=notes.append)
        if place:
            run.distiller.to(dist.device)
        freeze_pretrain_parts(run.distiller)

    # The strategy: how each step distils, driving the student (DDP-wrapped when there are several processes).
    if "strategy" in parts:
        if run.student is None or distill and run.distiller is None:
            raise ValueError("build_run: the strategy needs the student (and for task=distill the distiller)")
        try:
            wrapped = distributed.wrap_student(run.student, dist, config.sync_bn)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        run.strategy = build_strategy(config, run, wrapped, dist)
    return run
