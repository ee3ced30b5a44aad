"""What every strategy shares: the models it drives, loss weights, optimisers and mixed precision."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from adakd.distillers.base import Distiller
from adakd.models.stage_types import StagedOutput
from adakd.models.staged import StagedModel
from adakd.options import OptionsError, build_options, settable_fields
from adakd.ranks import average_across_ranks, average_gradients
from adakd.strategies.components import Component


@dataclass(frozen=True)
class MicroBatch:
    """Where one micro-batch sits in its optimiser step under gradient accumulation (`optim.accumulate`).

    The default, one micro-batch per step, is training without accumulation.
    """

    first: bool = True  # starts a step: the optimiser's gradients are zeroed before its backward
    last: bool = True  # ends a step: rank averaging, clipping and the optimiser step follow its backward
    of: int = 1  # micro-batches in this step: each backward carries 1/of of the step's gradient


def micro_batch_at(index: int, count: int | None, accumulate: int) -> MicroBatch:
    """The place of the 0-based micro-batch `index` of an epoch of `count` (None: unknown), stepping every
    `accumulate` of them.

    An epoch's last micro-batch always ends a step, so no gradient is carried across an epoch end or into a
    checkpoint; a shorter last step divides by its own micro-batch count (a mean over its samples, as a smaller
    last batch would give).
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    position = index % accumulate
    size = accumulate if count is None else min(accumulate, count - (index - position))
    return MicroBatch(first=position == 0, last=position == size - 1, of=size)


@dataclass(frozen=True)
class LossWeights:
    """total = ce * CE + kl * KL_T + method * (each distiller term)."""

    ce: float = 1.0
    method: float = 0.0
    kl: float = 0.0
    temperature: float = 4.0
    kl_standardize: bool = False  # z-score the logits of the KL term first (logit standardisation, LS)


@dataclass(frozen=True)
class RunFacts:
    """What the run's data says, handed to a strategy's options: one image's shape (channels first), the number of
    classes, and the run's length in optimiser steps over the whole training set (None when unknown)."""

    input_shape: tuple[int, ...]
    num_classes: int
    run_steps: int | None = None


# A refused strategy option: the options resolver's error, whose `key` names the option (the engine reports it as
# strategy.args.<key>). Options classes raise it from their own checks as OptionError(key, problem).
OptionError = OptionsError


FIGURE_KINDS = ("epochs", "steps", "blocks")

# A step's task part: the student's CE (and the teacher's, where the trainable-teacher ablation adds it); every other
# term (the distiller's, the extra KL) is its distillation part. `Strategy.optimizer_step` keeps the two apart only
# for a component that splits gradients (DOT).
TASK_TERMS = ("ce", "teacher_ce")


def split_task_and_distillation(terms: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The sums of a step's task terms (`TASK_TERMS`) and of its distillation terms (None when it has none)."""
    task = [value for name, value in terms.items() if name in TASK_TERMS]
    distill = [value for name, value in terms.items() if name not in TASK_TERMS]
    return torch.stack(task).sum(), (torch.stack(distill).sum() if distill else None)


def block_number(column: str) -> int | None:
    """The n of a column ending in `block<n>` (None for any other column)."""
    match = re.search(r"block(\d+)$", column)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Band:
    """A shaded span on a per-step figure, from its first x to where a phase of the run ended (e.g. a warm start)."""

    label: str
    """Its legend entry."""
    end: Callable[[Path], float | None] | None = None
    """Where the span ends, read from the run folder (what the run recorded or was configured with); None: unknown."""
    until: tuple[str, str] | None = None
    """Else (column, value): the x of the first row holding that value, when not every row does."""


@dataclass(frozen=True)
class Figure:
    """One PNG a strategy declares for `adakd plot`, as data; drawn only when the run logged its columns.

    Kinds: "epochs" (a line per column of metrics.csv over epochs), "steps" (a line per column of the CSV run file
    `source` over its column `x`, coloured along a colour map) and "blocks" (the last metrics row's columns by their
    block number, with `last` as the block after them).
    """

    file: str
    """PNG name without .png (also what --compare and messages call it)."""
    title: str
    """What it shows; the title is "<run>: <title>"."""
    ylabel: str
    columns: str
    """Regular expression searched in each column name; the matching columns are drawn."""
    kind: str = "epochs"
    source: str = "metrics.csv"
    """steps: the CSV file of the run folder the rows come from (a strategy's `run_files` entry)."""
    x: str = "epoch"
    """steps: the column of `source` on the x axis."""
    xlabel: str = "epoch"
    ylim: tuple[float, float] | None = None
    """Fixed y range (None: autoscale), e.g. for fractions whose small changes autoscaling would exaggerate."""
    by_block: bool = False
    """Order the columns by their trailing block<n> (block10 after block9) rather than as logged."""
    label: str = "tail"
    """Legend entry of a column: "full" (the name), "tail" (after its first '/'), "last" (after its last '/')."""
    band: Band | None = None
    """steps: a shaded span (see Band)."""
    last: str | None = None
    """blocks: the metrics column drawn as the block after the last (e.g. the student's own classifier)."""
    compare: bool = False
    """blocks: `adakd plot --compare RUN` draws other runs' values beside this run's."""

    def __post_init__(self) -> None:
        if self.kind not in FIGURE_KINDS:
            raise ValueError(f"Figure {self.file!r}: kind must be one of {FIGURE_KINDS}, got {self.kind!r}")
        if self.label not in ("full", "tail", "last"):
            raise ValueError(f"Figure {self.file!r}: label must be 'full', 'tail' or 'last', got {self.label!r}")
        re.compile(self.columns)  # a bad pattern fails where the strategy declares it, not when a run is plotted

    def pick(self, columns: Iterable[str]) -> list[str]:
        """The columns this figure draws, in block order when `by_block` (columns without a block number dropped)."""
        found = [c for c in dict.fromkeys(columns) if re.search(self.columns, c)]
        if not self.by_block:
            return found
        numbered = [(block_number(c), c) for c in found]
        return [c for n, c in sorted((n, c) for n, c in numbered if n is not None)]

    def legend(self, column: str) -> str:
        """The legend entry of one of its columns."""
        if self.label == "full":
            return column
        return column.split("/", 1)[-1] if self.label == "tail" else column.split("/")[-1]

    def by_blocks(self, rows: Sequence[Mapping[str, float]]) -> tuple[list[int], list[float]] | None:
        """blocks: block numbers and values of the last row (then `last` as one more block); None without them."""
        final = rows[-1] if rows else {}
        columns = sorted((c for c in self.pick(final) if block_number(c) is not None), key=block_number)
        if not columns or (self.last is not None and self.last not in final):
            return None
        blocks = [block_number(c) for c in columns]
        values = [final[c] for c in columns]
        if self.last is not None:
            blocks, values = [*blocks, blocks[-1] + 1], [*values, final[self.last]]
        return blocks, values


class Precision:
    """Autocast and gradient scaling on CUDA; plain float32 (no-ops) elsewhere."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.device_type = device.type
        # bfloat16 needs no loss scaling; float16 on GPUs without bf16 support does.
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward passes."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor, inputs: list[Tensor] | None = None) -> None:
        """Backward through the (possibly scaled) loss, into `inputs` only when given."""
        self.scaler.scale(loss).backward(inputs=inputs)

    def gradient_scale(self) -> float:
        """The factor a scaled backward multiplies gradients by (1.0 without float16 loss scaling)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def step(self, optimizer: torch.optim.Optimizer, update: bool = True, clip_grad_norm: float | None = None) -> None:
        """Optimiser step (skipped by the scaler on inf/NaN gradients), then the scale update.

        With `clip_grad_norm`, the gradients of `optimizer`'s parameters are first unscaled (so the norm is that of
        the true gradients) and clipped to that total 2-norm; the scaler remembers the unscale, so its step neither
        unscales twice nor misses an inf/NaN found there (the step is then skipped, as without clipping).
        A step with several optimisers passes `update=False` to all but the last, so the loss scale moves once
        per iteration.
        """
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        self.scaler.step(optimizer)
        if update:
            self.scaler.update()


class Strategy:
    """Owns the training step: forwards, masks and weights, backward, optimiser steps.

    The engine builds one optimiser per entry of `param_groups()` and hands them over with `attach`.
    Everything `training_step` returns is detached and stays on the device.

    The protocol below is all the engine knows of a strategy; every hook has a default that does nothing.
    Class level, read before the strategy is built: `option_class` and `preset` (its typed options),
    `resolve_options(args, facts)`, `needs_teacher_weights(options)`, `validation_fraction(options)`,
    `search_strategy` / `search_options` with `search_overrides`, `handoff`, `describe_search` (a stage that runs first
    and what it hands the final run), `run_files`, `figures` and `not_loss_columns`. Per instance: `attach`,
    `begin_micro_batch` / `gradient_sync` (the loop's, around each step), `attach_validation`, `max_steps`,
    `should_stop`, `evaluate`, `drain_records`, `artifacts`, `start_notices`, `decision_names` / `decide`,
    `owned_modules`, `state_dict` / `load_state_dict`, `training_step`.
    """

    option_class: ClassVar[type | None] = None
    """Frozen dataclass of the strategy's options (None: the strategy takes none); `self.options` holds one."""
    preset: ClassVar[dict[str, Any]] = {}
    """Option values of this registered name over the options class's defaults (the user's args win)."""
    search_strategy: ClassVar[str | None] = None
    """Registered name of the stage that runs first when none of `search_options` is given (None: no search)."""
    search_options: ClassVar[tuple[str, ...]] = ()
    """Options that carry a finished search's result; given any of them, the search stage is skipped."""
    run_files: ClassVar[tuple[str, ...]] = ()
    """Files the strategy writes into the run folder (its records' CSVs, its artifacts' JSON); a restart keeps them."""
    searched: ClassVar[str] = "its search's result"
    """What the search stage finds, in messages (e.g. "gamma")."""
    figures: ClassVar[tuple[Figure, ...]] = ()
    """Figures `adakd plot` draws for its runs besides accuracy and loss terms (see Figure)."""
    not_loss_columns: ClassVar[tuple[str, ...]] = ()
    """Parts of names of columns it logs under train/ that are not loss terms (kept out of the loss figure)."""
    max_steps: int | None = None
    """The run's length in iterations when the strategy bounds it (the engine runs enough epochs); None: optim.epochs."""
    accumulates: ClassVar[bool] = True
    """Whether `optim.accumulate` > 1 may run it; False for a step that must update the weights every micro-batch."""
    splits_refusal: ClassVar[str] = ""
    """Why its step cannot hand `optimizer_step` the task and distillation losses apart ("": it can), so a component
    that splits gradients (Component.splits_gradients) is refused with this reason."""

    def __init__(
        self,
        student: nn.Module,
        teacher: StagedModel | None,
        distiller: Distiller | None,
        weights: LossWeights,
        student_spots: list[int] | None = None,
        teacher_spots: list[int] | None = None,
        facts: RunFacts | None = None,
        **options: Any,
    ) -> None:
        self.options = type(self).resolve_options(options, facts)
        self.student = student  # a StagedModel, or DDP around one
        self.teacher = teacher
        self.distiller = distiller
        # What the step calls: the distiller itself, or the engine's DDP wrapper around it.
        self.distiller_forward: nn.Module | None = distiller
        self.weights = weights
        self.student_spots = list(student_spots or [])
        self.teacher_spots = list(teacher_spots or self.student_spots)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.precision = Precision(torch.device("cpu"), enabled=False)
        self.total_steps = 1
        self.clip_grad_norm: float | None = None
        self.accumulate = 1
        self.micro_batch = MicroBatch()
        # Modules the strategy builds itself (policy, adapters, heads), by checkpoint entry: see `own`.
        self.owned: dict[str, tuple[nn.Module, str]] = {}
        # Adaptive components the run adds (a learned temperature, an optimiser rule): see `add_component`.
        self.adaptive_components: list[Component] = []

    def add_component(self, component: Component) -> None:
        """Add an adaptive component (adakd.strategies.components) before the optimisers are built; it joins with
        `component.attach(self)`, which may own modules or refuse the combination (ValueError)."""
        if any(type(c) is type(component) for c in self.adaptive_components):
            raise ValueError(f"component {component.name!r} is added twice")
        refusal = self.component_refusal(type(component))
        if refusal:
            raise ValueError(refusal)
        component.attach(self)
        self.adaptive_components.append(component)

    @classmethod
    def component_refusal(cls, component: type[Component]) -> str:
        """Why this strategy cannot take the component class ("" when it can), from what the component needs (the
        gradients apart, a learned temperature) and the strategy's declared refusals; also checked when a sweep is
        planned."""
        for needed, refusal in ((component.splits_gradients, cls.splits_refusal),
                                (component.changes_temperature, cls.temperature_refusal)):
            if needed and refusal:
                return (f"{component.name} is not defined with {cls.__name__}: {refusal}; run it with "
                        f"strategy.name=standard or sakd, or drop components.{component.name}")
        return ""

    temperature_refusal: ClassVar[str] = ""
    """Why its step cannot use a learned temperature (a component's `temperature`; "": it can), so a component that
    learns one (Component.changes_temperature) refuses to join it with this reason."""

    def begin_epoch(self, epoch: int) -> None:
        """Called by the engine with the 1-based epoch before its first step (also the first epoch after a resume);
        forwards it to every component (schedules that move per epoch)."""
        for component in self.adaptive_components:
            component.begin_epoch(epoch)

    def step_temperature(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor | float:
        """The distillation temperature of this step: `weights.temperature`, unless a component changes it (asked
        once per step; a tensor may carry gradients to the component's parameters)."""
        temperature: Tensor | float = self.weights.temperature
        for component in self.adaptive_components:
            if component.changes_temperature:
                temperature = component.temperature(temperature, student_logits, teacher_logits)
        return temperature

    def distilling_at(self, temperature: Tensor | float) -> contextlib.AbstractContextManager:
        """The context the distiller's forward runs in: it uses the step's temperature for its own when a component
        changes it (and the distiller has one); otherwise nothing changes."""
        learned = any(component.changes_temperature for component in self.adaptive_components)
        if learned and self.distiller is not None and self.distiller.learned_temperature:
            return self.distiller.using_temperature(temperature)
        return contextlib.nullcontext()

    def component_metrics(self) -> dict[str, Tensor]:
        """The components' detached on-device scalars of the last step, merged into the step's output."""
        out: dict[str, Tensor] = {}
        for component in self.adaptive_components:
            out.update(component.metrics())
        return out

    def own(self, name: str, module: nn.Module, group: str = "main") -> nn.Module:
        """Register a module the strategy builds (a policy, adapters, heads) and return it.

        From then on the base class handles it: it follows `train(mode)`, its parameters join the optimiser
        `group` of `param_groups()` (after the student's and the distiller's in "main"), `state_dict()` saves it
        under `name` and `load_state_dict()` restores it strictly, and the engine converts its BatchNorm under
        sync_bn (`owned_modules`).
        """
        if name in self.owned or name == "distiller":
            raise ValueError(f"{type(self).__name__} owns a module named {name!r} already (or it is reserved)")
        self.owned[name] = (module, group)
        return module

    @classmethod
    def option_names(cls) -> set[str]:
        """Options a user may give (resolved-only fields, marked `metadata={"resolved": True}`, excluded)."""
        return set() if cls.option_class is None else {f.name for f in settable_fields(cls.option_class)}

    @classmethod
    def options_from_facts(cls, facts: RunFacts) -> dict[str, Any]:
        """Option values taken from the run's facts (e.g. the input size to measure shapes at); the user's win."""
        return {}

    @classmethod
    def resolve_options(cls, args: Mapping[str, Any], facts: RunFacts | None = None) -> Any:
        """The typed options from preset, run facts and user args (None without `option_class`), through the one
        options resolver (adakd.options: each value checked against its field's annotation); ValueError if bad."""
        if cls.option_class is None:
            if args:
                raise ValueError(f"unknown strategy option(s) {sorted(args)} for {cls.__name__}; it takes none")
            return None
        layers = (cls.preset, cls.options_from_facts(facts) if facts else {})
        try:
            return build_options(cls.option_class, args, layers=layers)
        except OptionsError as err:
            if err.unknown:
                raise ValueError(f"unknown strategy option(s) {list(err.unknown)} for {cls.__name__}; "
                                 f"{err.problem}") from None
            raise

    @classmethod
    def needs_teacher_weights(cls, options: Any) -> bool:
        """Whether the teacher must load trained weights (False when the strategy redraws them itself)."""
        return True

    @classmethod
    def validation_fraction(cls, options: Any) -> float | None:
        """Share of the training set held out and streamed to `attach_validation` (None: no held-out split)."""
        return None

    @classmethod
    def search_overrides(cls) -> dict[str, Any]:
        """Config values of the search stage's run over the final run's (merged into its config)."""
        return {}

    @classmethod
    def handoff(cls, search_dir: Path) -> dict[str, Any]:
        """Strategy args a final run takes from the finished search run in `search_dir` (one of `search_options`)."""
        return {}

    @classmethod
    def describe_search(cls, search_dir: Path) -> str:
        """One line saying what the finished search in `search_dir` found, printed after a pipeline."""
        return f"search: {search_dir}"

    @property
    def needs_validation(self) -> bool:
        """Whether this strategy learns on a held-out split (its `validation_fraction` is not None)."""
        return self.validation_fraction(self.options) is not None

    @property
    def validation_batches_used(self) -> int:
        """Held-out batches consumed so far: where a resumed run's held-out stream starts again."""
        return 0

    def attach_validation(self, batches: Iterator) -> None:
        """Receive the endless stream of held-out batches, positioned after `validation_batches_used`."""
        self.val_batches = batches

    def param_groups(self) -> dict[str, Any]:
        """Trainable parameters per optimiser: the student and the distiller's parts share "main".

        A value is a list of parameters or {"params": [...], "lr_scale": s, "weight_decay": wd}.
        """
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.distiller is not None:
            params += [p for p in self.distiller.trainable_parameters() if p.requires_grad]
        groups: dict[str, Any] = {"main": params}
        for module, group in self.owned.values():
            groups.setdefault(group, []).extend(p for p in module.parameters() if p.requires_grad)
        return groups

    def optimizer_specs(self) -> dict[str, Any]:
        """`param_groups()` as the engine builds its optimisers from them: each group's spec passed through every
        component's `optimizer_group` (which may give it its own optimiser); without components, unchanged."""
        groups = self.param_groups()
        if not self.adaptive_components:
            return groups
        specs = {}
        for name, group in groups.items():
            spec = dict(group) if isinstance(group, dict) else {"params": list(group)}
            for component in self.adaptive_components:
                spec = component.optimizer_group(name, spec)
            specs[name] = spec
        return specs

    @property
    def splits_gradients(self) -> bool:
        """Whether a component needs the task and distillation gradients apart (`optimizer_step`'s `distill_loss`)."""
        return any(component.splits_gradients for component in self.adaptive_components)

    def attach(self, optimizers: dict[str, torch.optim.Optimizer], precision: Precision,
               total_steps: int = 1, clip_grad_norm: float | None = None, accumulate: int = 1) -> None:
        """Receive the optimisers built from `param_groups()`, the precision policy, the run's length in steps (micro-
        batches), the gradient-norm bound of every optimiser step (None: no clipping) and the micro-batches per
        optimiser step (gradient accumulation)."""
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        if accumulate > 1 and not self.accumulates:
            raise ValueError(f"{type(self).__name__} does not support gradient accumulation (optim.accumulate="
                             f"{accumulate}); run it with optim.accumulate=1")
        self.optimizers = optimizers
        self.precision = precision
        self.total_steps = total_steps
        self.clip_grad_norm = clip_grad_norm
        self.accumulate = accumulate
        self.micro_batch = MicroBatch()

    def begin_micro_batch(self, index: int, count: int | None) -> None:
        """Called by the loop before `training_step` of the 0-based micro-batch `index` of an epoch of `count`.

        Places it in its optimiser step (every `accumulate` micro-batches and at the epoch's end). A strategy driven
        without these calls steps on every `training_step`, as with accumulate=1.
        """
        self.micro_batch = micro_batch_at(index, count, self.accumulate)

    @contextlib.contextmanager
    def gradient_sync(self) -> Iterator[None]:
        """The context the loop runs each `training_step` in: on a micro-batch that does not end its optimiser step,
        every DDP wrapper the strategy drives (the student, the distiller's learning heads) skips its all-reduce.

        The gradients then add up on each rank and the step's last backward all-reduces their sums once, which
        averages them as N all-reduces would, at 1/N of the communication. DDP decides at the forward whether the
        backward all-reduces, so this holds the whole step, forward and backward. Parameters outside DDP
        (`unsynced`) are averaged once per step by `optimizer_step` already.
        """
        with contextlib.ExitStack() as stack:
            if not self.micro_batch.last:
                for wrapper in self.ddp_wrappers():
                    stack.enter_context(wrapper.no_sync())
            yield

    def ddp_wrappers(self) -> list[nn.Module]:
        """The DDP wrappers (anything with DDP's `no_sync`) among the modules the strategy's steps run."""
        driven = [self.student, self.distiller_forward]
        return [module for module in driven if module is not None and callable(getattr(module, "no_sync", None))]

    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        loss: Tensor | None = None,
        *,
        distill_loss: Tensor | None = None,
        grads: Iterable[tuple[Tensor, Tensor | None]] | None = None,
        inputs: list[Tensor] | None = None,
        unsynced: list[Tensor] | None = None,
        adjust: Callable[[], None] | None = None,
        update: bool = True,
    ) -> None:
        """The tail of every training step: zero_grad, gradients, rank averaging, optional clipping, step.

        The gradients come from a backward of `loss` through the precision's loss scaler (into `inputs` only when
        given), or are assigned from `grads` (parameter, gradient) pairs, multiplied by the loss scale so that they
        look like a scaled backward's. `unsynced` are parameters outside DDP whose gradients are averaged across
        ranks here; `adjust` then edits gradients in place before clipping (`self.clip_grad_norm`, unscaled first)
        and the step, which the scaler skips on inf/NaN. `update=False` leaves the loss scale for a later step.

        Gradient accumulation (`self.micro_batch`, placed by the loop): the first micro-batch of a step zeroes the
        gradients, every one adds 1/of of its loss's (or assigned) gradients, so `of` micro-batches of B samples give
        the gradient of one batch of of*B for a mean-reduced loss; only the last averages across ranks, adjusts
        (on the accumulated gradients), clips and steps, so the float16 loss scale stays fixed within a step.
        BatchNorm still normalises and updates its running statistics per micro-batch, as in any accumulation.
        Under DDP the loop runs the micro-batches before the last inside `gradient_sync`, so their backwards skip
        DDP's all-reduce and the last one's all-reduces the accumulated sums.

        `distill_loss` is the step's distillation part, `loss` (or `grads`) then its task part. Without a component
        that splits gradients they are summed: one backward of loss + distill_loss. With one (`splits_gradients`,
        DOT), the distillation gradients come first from their own backward (torch.autograd.grad, keeping the graph,
        as DOT's reference backwards the KD loss first with retain_graph), into `optimizer.distill_grads`, and the task
        loss's backward fills `.grad`: two backward passes. See `_step_apart` for averaging, float16 and clipping.
        """
        micro = self.micro_batch
        apart = distill_loss is not None and self.splits_gradients
        if apart and adjust is not None:
            raise ValueError(f"{type(self).__name__}: `adjust` edits only .grad, so it cannot run with a component "
                             "that keeps the distillation gradients apart")
        if micro.first:
            optimizer.zero_grad(set_to_none=True)
            if apart:
                optimizer.distill_grads = None
        if grads is not None:
            grads = [(param, grad) for param, grad in grads if grad is not None]
            if grads and self.precision.scaler.is_enabled():
                # The scaler creates its scale tensor in scale(), which assigned gradients never pass through;
                # without it the step's unscale fails on the first iteration.
                self.precision.scaler.scale(torch.zeros((), device=grads[0][1].device))
            factor = self.precision.gradient_scale() / micro.of
            for param, grad in grads:
                grad = (grad * factor if factor != 1.0 else grad).to(param.dtype)
                # Out of place: an assigned gradient may be a tensor the strategy still holds.
                param.grad = grad if param.grad is None else param.grad + grad
        if apart:
            self._distill_backward(optimizer, distill_loss, inputs)
        elif distill_loss is not None:
            loss = distill_loss if loss is None else loss + distill_loss
        if loss is not None:
            self.precision.backward(loss / micro.of if micro.of != 1 else loss, inputs=inputs)
        if not micro.last:
            return
        if unsynced:
            average_gradients(unsynced)
        if adjust is not None:
            adjust()
        if apart:
            self._step_apart(optimizer, update)
            return
        self.precision.step(optimizer, update=update, clip_grad_norm=self.clip_grad_norm)

    def _distill_backward(self, optimizer: torch.optim.Optimizer, distill_loss: Tensor,
                          inputs: list[Tensor] | None) -> None:
        """Add this micro-batch's (loss-scaled, 1/of) distillation gradients to `optimizer.distill_grads`."""
        if not hasattr(optimizer, "distill_grads"):
            raise ValueError(f"a component splits the gradients but the optimiser {type(optimizer).__name__} takes no "
                             "distillation gradients: its optimizer_group must give this group one that does")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        wanted = set(map(id, inputs)) if inputs is not None else None
        targets = [i for i, p in enumerate(params) if p.requires_grad and (wanted is None or id(p) in wanted)]
        of = self.micro_batch.of
        scaled = self.precision.scaler.scale(distill_loss / of if of != 1 else distill_loss)
        found = torch.autograd.grad(scaled, [params[i] for i in targets], retain_graph=True, allow_unused=True)
        stash = optimizer.distill_grads or [None] * len(params)
        for i, grad in zip(targets, found):
            if grad is not None:
                stash[i] = grad if stash[i] is None else stash[i] + grad
        optimizer.distill_grads = stash

    def _step_apart(self, optimizer: torch.optim.Optimizer, update: bool) -> None:
        """The step of an optimiser holding the task gradients in .grad and the distillation ones in `distill_grads`.

        Ranks: the distillation gradients are averaged here (DDP averages only what its backward fills). float16:
        a non-finite distillation gradient is added to a task gradient before the scaler unscales them, so the
        scaler's own check skips the step and lowers the scale as it would for the summed gradient; the distillation
        gradients are then unscaled too. Clipping bounds the 2-norm of the summed gradient (task + distillation),
        scaling both parts by the same factor, so `optim.clip_grad_norm` means what it means without a split.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]]
        stash = optimizer.distill_grads or [None] * len(params)
        average_across_ranks([g for g in stash if g is not None])
        scaler = self.precision.scaler
        if scaler.is_enabled():
            present = [g for g in stash if g is not None]
            task = [p.grad for p in params if p.grad is not None]
            if present and task:
                bad = torch.stack([g.isfinite().all() for g in present]).all().logical_not()
                task[0].view(-1)[:1].add_(torch.where(bad, float("inf"), 0.0).to(task[0].dtype))
            scaler.unscale_(optimizer)
            inverse = 1.0 / self.precision.gradient_scale()
            stash = [None if g is None else g * inverse for g in stash]
        if self.clip_grad_norm is not None:
            summed = [(p.grad if p.grad is not None else 0) + (g if g is not None else 0)
                      for p, g in zip(params, stash) if p.grad is not None or g is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in summed]))
            factor = (self.clip_grad_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(factor.to(p.grad.dtype))
            stash = [None if g is None else g * factor.to(g.dtype) for g in stash]
        optimizer.distill_grads = stash
        self.precision.step(optimizer, update=update)

    def train(self, mode: bool = True) -> None:
        """Set train/eval mode of the trainable parts; the teacher stays in eval."""
        self.student.train(mode)
        if self.distiller is not None:
            self.distiller.train(mode)
        for module, _ in self.owned.values():
            module.train(mode)
        if self.teacher is not None:
            self.teacher.eval()

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint (distiller parts, owned modules by name); the engine saves student and optimisers."""
        state = {"distiller": self.distiller.state_dict() if self.distiller is not None else {}}
        state.update({name: module.state_dict() for name, (module, _) in self.owned.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` strictly."""
        if self.distiller is not None:
            self.distiller.load_state_dict(state["distiller"], strict=True)
        elif state.get("distiller"):
            raise ValueError("checkpoint holds distiller state but this run has no distiller")
        missing = [name for name in self.owned if name not in state]
        if missing:
            raise ValueError(f"checkpoint has no {', '.join(missing)} for {type(self).__name__}: it was written by "
                             "another strategy; resume it with the strategy it was trained with")
        for name, (module, _) in self.owned.items():
            module.load_state_dict(state[name], strict=True)

    def owned_modules(self) -> list[nn.Module]:
        """Trainable modules the strategy builds itself (registered with `own`); the engine may convert their BN."""
        return [module for module, _ in self.owned.values()]

    def evaluate(self, loader) -> dict[str, float]:
        """Extra test metrics (logged as test/<name>) beside the student's own accuracy."""
        return {}

    def drain_records(self) -> dict[str, list[dict[str, Any]]]:
        """Per-step rows logged since the last call, by CSV file name."""
        return {}

    def artifacts(self) -> dict[str, Any]:
        """JSON-serialisable objects to write as <name>.json after every epoch."""
        return {}

    def should_stop(self) -> bool:
        """True when the strategy has finished before the configured epochs."""
        return False

    def decision_names(self) -> list[str]:
        """Names of the per-sample decisions `decide` returns, one column each ([]: the strategy makes none)."""
        return []

    def decide(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(decisions 0/1, their probabilities), each [B, len(decision_names())], for a batch of images."""
        raise NotImplementedError(f"{type(self).__name__} makes no per-sample decisions")

    def start_notices(self) -> list[tuple[str, bool]]:
        """(line, is_warning) pairs the engine prints and logs once when the run starts (e.g. how a search was sized)."""
        return []

    @staticmethod
    def select(output: StagedOutput, spots: list[int], preact: bool = False) -> list[Tensor]:
        """The features of one network at its spots."""
        source = output.preacts if preact else output.features
        return [source[k] for k in spots]

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """One optimisation step (`step` is the 0-based global step); returns detached on-device scalars.

        Every value is a per-batch mean (the engine averages them weighted by batch size) except 'correct', a count.
        """
        raise NotImplementedError
