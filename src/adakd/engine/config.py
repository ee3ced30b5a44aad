"""Typed run configuration: frozen dataclasses filled from YAML, presets and dotted overrides.

YAML is data: it names registry entries (`model.name: resnet20`, `distill.method: kd`), never import paths.
An unknown key or a value of the wrong type fails with the dotted key and a suggestion.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from adakd.options import OptionsError, build_options, coerce, to_plain
from adakd.registry import suggestions


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    """A network: registry name and optional weights file (CRD-format, torchvision or adakd)."""

    name: str | None = None
    weights: str | None = None
    # The entry of the weights file to read (timm's 'state_dict_ema'); null: the first of 'model', 'state_dict',
    # 'model_state_dict' (a file offering another entry that fits says so in one line).
    weights_key: str | None = None
    # Load every weight but the classifier, which starts fresh for this dataset's classes (an ImageNet checkpoint for
    # a 4-class folder); every other key must still fit exactly.
    reset_classifier: bool = False
    width_mult: float | None = None
    in_chans: int | None = None  # input channels; null: the dataset's (1 for grayscale sets, else 3)
    # Start from published weights (timm / torchvision models; adakd.models.external): true, a torchvision weights
    # name (IMAGENET1K_V2), or a timm weights file; the classifier is resized to the dataset's classes.
    pretrained: bool | str = False
    args: dict[str, Any] = field(default_factory=dict)  # extra builder arguments, e.g. timm's img_size, drop_rate


@dataclass(frozen=True)
class DataConfig:
    """Dataset, location and batch sizes."""

    name: str = "cifar100"
    root: str | None = None
    batch_size: int = 64
    test_batch_size: int = 64
    # Loader worker processes for datasets read from disk (in-memory ones need none); null: auto, at most 4 and
    # never more than the cores of this process less one (4 on 2 cores oversubscribed them and made torch warn).
    num_workers: int | None = None
    image_size: int | None = None
    # Normalisation (0..1 units, one value per channel); null: the pretrained model's when model.pretrained (else
    # teacher.pretrained) is on, else the dataset's. A run's config.yaml records the values used.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    tiny_aug: str = "flip"
    train_size: int | None = None  # keep only the first N training samples (quick experiments)
    in_memory: bool | None = None  # folder datasets: hold decoded images in memory; null: when under 2 GiB
    # Fetch a missing dataset (cifar10, cifar100, mnist, fashion-mnist, svhn, stl10, tiny-imagenet) with its
    # checksum, as every peer does; false: never touch the network.
    download: bool = True
    mirror: str | None = None  # a base URL replacing the download sites (else $ADAKD_DATA_MIRROR)
    # Views per training image: 2 yields each batch as [weak; strong] (2B images, targets repeated; MLKD's recipe),
    # the strong view `strong_aug` (randaugment: RandAugment n=2 + Cutout, data/strong_aug.py); in-memory sets only.
    views: int = 1
    strong_aug: str = "randaugment"


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum and a multi-step schedule (the papers' CIFAR recipe by default)."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    epochs: int = 240
    milestones: tuple[int, ...] = (150, 180, 210)
    lr_decay: float = 0.1
    scale_lr_with_batch: bool = False  # lr *= global_batch / 256 (the ImageNet convention)
    # Bound on the total 2-norm of each optimiser's gradients, taken after unscaling under AMP; None: no clipping.
    clip_grad_norm: float | None = None
    # Micro-batches per optimiser step (gradient accumulation): N batches of data.batch_size step as one of N times
    # that size (scale_lr_with_batch counts N * batch_size); each epoch still ends on a step. BatchNorm still sees
    # each micro-batch alone.
    accumulate: int = 1


@dataclass(frozen=True)
class DistillConfig:
    """Loss composition: ce_weight * CE + kl_weight * KL_T + method_weight * method terms."""

    method: str = "kd"
    ce_weight: float | None = None  # None: the distiller's default (KD 0.1, the others 1.0)
    method_weight: float | None = None  # None: the distiller's default (KD 0.9, AT 1000, ...)
    kl_weight: float = 0.0  # an extra KD term on top of any method (a strategy's own KD weight, e.g. a paper's beta_1)
    temperature: float = 4.0  # of that extra KD term; a method's own temperature is in `args`
    # Logit standardisation (LS, CVPR 2024) on that extra KD term: both logit sets z-scored per sample, then
    # `temperature` as LS's base temperature (T^2 kept); a method's own switch is `args.standardize` (kd, dkd).
    kl_standardize: bool = False
    spots: tuple[int | str, ...] | None = None  # stage indices (or "stages"); None: the distiller's default
    args: dict[str, Any] = field(default_factory=dict)  # the distiller's own hyper-parameters
    # Per-method defaults that a preset carries (DKD's per-pair beta, ImageNet's KD weights), used only when
    # `method` matches: {method: {ce_weight, method_weight, args}}. Explicit top-level values win.
    by_method: dict[str, Any] = field(default_factory=dict)

    def for_method(self) -> "DistillConfig":
        """This config with the `by_method` entry of `method` filled in where nothing explicit was given."""
        entry = self.by_method.get(self.method, {})
        return dataclasses.replace(
            self,
            ce_weight=self.ce_weight if self.ce_weight is not None else entry.get("ce_weight"),
            method_weight=self.method_weight if self.method_weight is not None else entry.get("method_weight"),
            args={**entry.get("args", {}), **self.args},
        )


@dataclass(frozen=True)
class StrategyConfig:
    """Where and how much to distill; `args` are the strategy's own options."""

    name: str = "standard"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LogConfig:
    """Logging cadence and sinks."""

    interval: int = 50  # steps between host syncs for the progress bar
    eval_every: int = 1  # epochs between test evaluations; the last epoch is always evaluated
    tensorboard: bool = True
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; saved resolved next to its results."""

    task: str = "train"  # "train" (a model alone, e.g. a teacher) or "distill" (student + frozen teacher)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on CUDA only; ignored on CPU
    channels_last: bool = False
    compile: bool = False  # torch.compile the student's and teacher's forwards: fused kernels, CUDA graphs on CUDA
    deterministic: bool = False
    sync_bn: bool = False
    # CPU threads of each process (torch.set_num_threads); null: auto, the cores no other process is using at start
    # (shared among the processes of a DDP run, at most torch's default). torch's default, one per core,
    # oversubscribes a loaded machine (measured 7.5x slower than 1 thread per process under load).
    threads: int | None = None
    out_dir: str = "runs"
    name: str | None = None  # run directory name; default derived from task, models and method
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="resnet20"))
    teacher: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    # Adaptive components added to the strategy's step (adakd.strategies.components), by registered name: true or
    # a mapping of options switches one on, e.g. {ctkd: {mode: global}, dot: true}.
    components: dict[str, Any] = field(default_factory=dict)
    log: LogConfig = field(default_factory=LogConfig)


def _build(cls: type, values: dict[str, Any]) -> Any:
    """`cls` from plain values through the one options resolver (adakd.options); a refused value is a ConfigError."""
    try:
        return build_options(cls, values, noun="config key")
    except OptionsError as err:
        raise ConfigError(str(err)) from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config, for YAML and checkpoints."""
    return to_plain(config)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins; `args` mappings merge key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# Short names for the most used keys: `adakd distill method=at epochs=30 lr=0.1`.
SHORTHANDS = {
    "method": "distill.method",
    "strategy": "strategy.name",
    "student": "model.name",
    "dataset": "data.name",
    "epochs": "optim.epochs",
    "lr": "optim.lr",
}


def parse_override(text: str) -> dict[str, Any]:
    """Turn `optim.lr=0.01` into {'optim': {'lr': 0.01}} (the value is read as YAML; SHORTHANDS expand)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    key = SHORTHANDS.get(key, key)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write e.g. optim.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def preset_names() -> list[str]:
    """Names of the YAML presets shipped inside the package."""
    return sorted(p.name[:-5] for p in resources.files("adakd.presets").iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # PyYAML's own text spans several lines; keep one
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_preset(name: str) -> dict[str, Any]:
    """The raw mapping of a shipped preset; presets may name a `base` preset they extend."""
    names = preset_names()
    if name not in names:
        close = suggestions(name, names)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Shipped presets: {', '.join(names)}")
    data = yaml.safe_load(resources.files("adakd.presets").joinpath(f"{name}.yaml").read_text()) or {}
    base = data.pop("base", None)
    return merge(load_preset(base), data) if base else data


def resolve(
    presets: list[str] | None = None,
    files: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    after: list[str] | None = None,
) -> RunConfig:
    """Defaults <- presets <- YAML files <- dotted overrides <- `after` overrides, validated into a RunConfig.

    `after` is one more layer on top of the command line (a sweep's teacher_overrides): its epochs rescale the
    milestones the layers below wrote, exactly as an `epochs=` on the command line of `adakd train` would.
    """
    values: dict[str, Any] = dict(base or {})
    # The epochs that the milestones in force were written for: a later layer that changes only the epochs
    # (`epochs=5` on the 240-epoch recipe) scales them, or the lr would never decay.
    milestone_epochs = _optim_value(values, "epochs") if _optim_value(values, "milestones") is not None else None
    # The command line is one layer: `optim.milestones=[10] epochs=20` gives both, in either order.
    layers = [load_preset(name) for name in presets or []] + [read_yaml(path) for path in files or []]
    layers += [override_layer(texts) for texts in (overrides, after) if texts is not None]
    for layer in layers:
        values = merge(values, layer)
        if _optim_value(layer, "milestones") is not None:
            milestone_epochs = _optim_value(values, "epochs")
    config = _build(RunConfig, values)
    config = scale_milestones(config, OptimConfig.epochs if milestone_epochs is None else milestone_epochs)
    validate(config)
    return config


def override_layer(texts: list[str]) -> dict[str, Any]:
    """Dotted overrides merged into one layer (later ones win)."""
    layer: dict[str, Any] = {}
    for text in texts:
        layer = merge(layer, parse_override(text))
    return layer


def _optim_value(values: dict[str, Any], key: str) -> Any:
    """values['optim'][key] when both levels exist, else None."""
    optim = values.get("optim")
    return optim.get(key) if isinstance(optim, dict) else None


def scale_milestones(config: RunConfig, written_for: Any) -> RunConfig:
    """The config with its lr milestones scaled from `written_for` epochs to optim.epochs (m * E / E0, rounded).

    Every decay is kept (two may fall on one epoch), so the last epochs run at the recipe's final lr.
    """
    epochs = config.optim.epochs
    if not isinstance(written_for, int) or isinstance(written_for, bool) or written_for < 1 or written_for == epochs:
        return config
    scaled = tuple(max(1, math.floor(m * epochs / written_for + 0.5)) for m in config.optim.milestones)
    return dataclasses.replace(config, optim=dataclasses.replace(config.optim, milestones=scaled))


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its saved dict (e.g. a run directory's config.yaml)."""
    config = _build(RunConfig, values)
    validate(config)
    return config


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def is_plain_folder_name(name: str) -> bool:
    """True for one path component: no separator, not '.' or '..', not absolute (so out_dir/name stays inside)."""
    return "/" not in name and "\\" not in name and name not in (".", "..") and not Path(name).is_absolute()


def validate(config: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    for method, entry in config.distill.by_method.items():
        allowed = {"ce_weight": float, "method_weight": float, "args": dict}
        if not isinstance(entry, dict):
            raise ConfigError(f"distill.by_method.{method}: expected a mapping of ce_weight, method_weight, args")
        for key, value in entry.items():
            if key not in allowed:
                raise ConfigError(f"unknown config key distill.by_method.{method}.{key}; valid keys: "
                                  f"{', '.join(allowed)}")
            try:
                coerce(value, allowed[key], f"distill.by_method.{method}.{key}")
            except OptionsError as err:
                raise ConfigError(str(err)) from None
    checks = [
        (config.task in ("train", "distill"), "task", "must be 'train' or 'distill'"),
        (0 <= config.seed < 65536, "seed", "must lie in [0, 65536) (it seeds a 32-bit generator with the epoch)"),
        (config.optim.epochs < 65536, "optim.epochs", "must be < 65536"),
        (config.optim.lr > 0, "optim.lr", "must be > 0"),
        (0 <= config.optim.momentum < 1, "optim.momentum", "must be in [0, 1)"),
        (config.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (config.optim.epochs >= 1, "optim.epochs", "must be >= 1"),
        (0 < config.optim.lr_decay <= 1, "optim.lr_decay", "must be in (0, 1]"),
        (list(config.optim.milestones) == sorted(config.optim.milestones), "optim.milestones", "must be increasing"),
        (config.optim.clip_grad_norm is None or config.optim.clip_grad_norm > 0, "optim.clip_grad_norm",
         "must be > 0 (or null for no clipping)"),
        (config.optim.accumulate >= 1, "optim.accumulate", "must be >= 1 (micro-batches per optimiser step)"),
        (config.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
        (config.data.test_batch_size >= 1, "data.test_batch_size", "must be >= 1"),
        (config.data.num_workers is None or config.data.num_workers >= 0, "data.num_workers",
         "must be >= 0 (or null for auto)"),
        (config.data.image_size is None or config.data.image_size >= 1, "data.image_size",
         "must be >= 1 (or null for the dataset's own size)"),
        (config.data.train_size is None or config.data.train_size >= 1, "data.train_size",
         "must be >= 1 (or null for the whole training set)"),
        (config.data.tiny_aug in ("flip", "crop"), "data.tiny_aug", "must be 'flip' or 'crop'"),
        (config.data.views in (1, 2), "data.views", "must be 1 or 2 (2: a weak and a strong view of each image)"),
        (config.data.strong_aug == "randaugment", "data.strong_aug", "must be 'randaugment'"),
        (config.data.mirror is None or "://" in config.data.mirror, "data.mirror",
         "must be a base URL such as https://host/datasets/ (or null for the official sites)"),
        (all(m >= 1 for m in config.optim.milestones), "optim.milestones",
         "must be epochs >= 1 after which the lr decays"),
        (config.model.width_mult is None or config.model.width_mult > 0, "model.width_mult", "must be > 0"),
        (config.teacher.width_mult is None or config.teacher.width_mult > 0, "teacher.width_mult", "must be > 0"),
        (_DEVICE.fullmatch(config.device) is not None, "device", "must be auto, cpu, cuda, cuda:N or mps"),
        (config.distill.temperature > 0, "distill.temperature", "must be > 0"),
        (config.distill.kl_weight >= 0, "distill.kl_weight", "must be >= 0"),
        ((config.distill.ce_weight or 0) >= 0, "distill.ce_weight", "must be >= 0"),
        ((config.distill.method_weight or 0) >= 0, "distill.method_weight", "must be >= 0"),
        (config.log.interval >= 1, "log.interval", "must be >= 1"),
        (config.log.eval_every >= 1, "log.eval_every", "must be >= 1 (epochs between test evaluations)"),
        (config.model.in_chans is None or config.model.in_chans >= 1, "model.in_chans", "must be >= 1"),
        (config.teacher.in_chans is None or config.teacher.in_chans >= 1, "teacher.in_chans", "must be >= 1"),
        (config.threads is None or config.threads >= 1, "threads",
         "must be >= 1 (or null for auto: the cores not busy at start)"),
        (config.model.name is not None, "model.name", "must name a model, e.g. model.name=resnet20"),
        (config.task != "distill" or config.teacher.name is not None, "teacher.name",
         "must name the teacher for task=distill, e.g. teacher.name=resnet56 teacher.weights=PATH"),
    ]
    for ok, key, message in checks:
        if not ok:
            value: Any = config
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"{key} {message}, got {list(value) if isinstance(value, tuple) else value!r}")
    if config.name and not is_plain_folder_name(config.name):
        # The run folder is out_dir/name: a path here would write (and on resume, read) outside out_dir.
        raise ConfigError(f"name must be a plain folder name (no '/', '\\', '..' or absolute path), got "
                          f"{config.name!r}; choose where runs go with out_dir=PATH and give name=NAME")
    if config.task == "train":
        # `adakd train` fits model.name alone with cross-entropy: distillation settings would be ignored silently.
        # teacher.name alone is allowed (a pair preset sets it, and training its student alone is the baseline).
        ignored = [text for text, given in (
            (f"teacher.weights={config.teacher.weights}", config.teacher.weights is not None),
            (f"method={config.distill.method}", config.distill.method != DistillConfig.method),
            (f"strategy={config.strategy.name}", config.strategy.name != StrategyConfig.name),
            (f"distill.kl_weight={config.distill.kl_weight}", config.distill.kl_weight != DistillConfig.kl_weight),
            ("distill.kl_standardize=true", config.distill.kl_standardize),
            (f"components={config.components}", bool(config.components)),
        ) if given]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)}: `adakd train` trains model.name alone with cross-entropy and "
                              "would ignore this; to distill run `adakd distill` with teacher.name, teacher.weights "
                              "and method=...")
    for key, spec in (("model", config.model), ("teacher", config.teacher)):
        check_pretrained(key, spec)
    for key in ("mean", "std"):
        values = getattr(config.data, key)
        if values is not None and (not values or any(not math.isfinite(v) or (key == "std" and v <= 0)
                                                     for v in values)):
            raise ConfigError(f"data.{key} must be a list of finite numbers, one per channel, in 0..1 units"
                              f"{' and > 0' if key == 'std' else ''}, e.g. [0.485, 0.456, 0.406]; got {list(values)}")
    if config.task == "distill" and config.distill.kl_standardize and config.distill.kl_weight == 0:
        # The switch would silently standardise a term that is not in the loss.
        raise ConfigError("distill.kl_standardize=true standardises the extra KL term, which distill.kl_weight=0 "
                          "leaves out of the loss; give distill.kl_weight > 0 (e.g. distill.kl_weight=1), or for a "
                          "method's own logits use distill.args.standardize=true (kd, dkd)")
    args = config.distill.for_method().args
    value = args.get("temperature")  # a method's own temperature (KD, DKD, CRD) divides its logits
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise ConfigError(f"distill.args.temperature must be > 0 (it divides the logits), got {value}")


def check_pretrained(key: str, spec: ModelConfig) -> None:
    """`{key}.pretrained` names published weights of a timm / torchvision model, and is not given with a file."""
    if spec.pretrained is False or spec.name is None:
        return
    zoo = ":" not in spec.name  # timm:NAME / torchvision:NAME name their source
    if spec.pretrained is True and zoo:
        # Zoo (CIFAR) models have no published ImageNet weights; their published CIFAR teachers are files.
        raise ConfigError(f"{key}.pretrained=true: {spec.name!r} is an adakd zoo model, which has no published "
                          "pretrained weights; fetch the published CIFAR teachers with `adakd teachers fetch` and "
                          f"pass one as {key}.weights=PATH, or use a timm: / torchvision: model")
    if isinstance(spec.pretrained, str) and zoo:
        raise ConfigError(f"{key}.pretrained={spec.pretrained!r}: {spec.name!r} is an adakd zoo model; load a "
                          f"weights file with {key}.weights=PATH")
    if spec.weights:
        raise ConfigError(f"{key}.pretrained and {key}.weights are both given: give one ({key}.pretrained starts "
                          f"from published weights, {key}.weights loads your file)")


def dump_yaml(config: RunConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
