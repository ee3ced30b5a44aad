"""Adaptive components: what a run adds to any strategy's step, whichever distiller it runs.

A component adapts one thing the step uses besides where and how much to distil: the temperature (CTKD) or the
optimiser's update (DOT). It is one file plus `@register_component(name)`; a run lists it under `components`
(`components: {ctkd: {mode: global}}`, or `components.dot=true` on the command line for its defaults). The engine
builds the listed components and hands each to the strategy (`Strategy.add_component`) before the optimisers are
built; the strategy calls the hooks below, so neither the engine nor a strategy names a component.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from torch import Tensor

from adakd.options import OptionsError, build_options
from adakd.registry import Registry

if TYPE_CHECKING:  # the strategies import this module; a component sees them only through the hooks' arguments
    from adakd.strategies.base import RunFacts, Strategy

COMPONENTS: Registry = Registry("component")


def register_component(name: str):
    """Register a Component subclass under `name`."""
    return COMPONENTS.register(name)


def available(pattern: str = "*") -> list[str]:
    """Names of the registered components."""
    return COMPONENTS.available(pattern)


class Component:
    """Base class: every hook has a default that changes nothing.

    Class level: `option_class` (a frozen dataclass of its options; None: it takes none). Per instance: `attach`
    (join a strategy: own modules, refuse a combination it does not define), `begin_epoch`, `temperature`
    (the distillation temperature of a step), `optimizer_group` (edit the optimiser spec of a parameter group),
    `metrics` (scalars logged under train/ each step).
    """

    name: ClassVar[str] = "component"
    option_class: ClassVar[type | None] = None

    def __init__(self, options: Any = None, facts: "RunFacts | None" = None) -> None:
        self.options = options
        self.facts = facts

    @classmethod
    def resolve_options(cls, args: Mapping[str, Any], where: str = "") -> Any:
        """The typed options from the user's args (None without `option_class`); OptionsError naming
        `where`.<key> if bad."""
        if cls.option_class is None:
            if args:
                raise OptionsError(where or cls.name, f"{cls.name} takes no options, got {sorted(args)}")
            return None
        return build_options(cls.option_class, dict(args), where, noun="option")

    def attach(self, strategy: "Strategy") -> None:
        """Join `strategy` once, before its optimisers are built (e.g. `strategy.own(...)` a learned module); raise
        ValueError naming the combination and the fix where this component is not defined with it."""

    def begin_epoch(self, epoch: int) -> None:
        """Called with the 1-based epoch before its first step (schedules that move per epoch)."""

    def temperature(self, base: float, student_logits: Tensor, teacher_logits: Tensor) -> Tensor | float:
        """The distillation temperature of this step, from the configured `base` (default: `base` itself).

        A scalar, or one value per sample ([B]); a tensor may carry gradients to the component's own parameters."""
        return base

    changes_temperature: ClassVar[bool] = False
    """True when `temperature` returns anything but its base (a strategy then asks it every step)."""

    def optimizer_group(self, group: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The optimiser spec of the strategy's parameter `group` ({"params": [...], ...}); default unchanged.

        A spec may name its own optimiser: "optimizer" is then a callable (params, lr, momentum, nesterov,
        weight_decay) -> torch.optim.Optimizer that engine/optim.py `build_optimizers` calls instead of SGD."""
        return spec

    splits_gradients: ClassVar[bool] = False
    """True when the optimiser step needs the task and the distillation gradients apart (DOT).

    Then `optimizer_group` gives the group an optimiser with a `distill_grads` attribute: before its `step()`,
    `Strategy.optimizer_step` leaves the task gradients in `.grad` and sets `distill_grads` to the distillation
    gradients, one per parameter of its param groups in order (None where the distillation loss does not reach it).
    A strategy whose step cannot give the two apart refuses such a component (`Strategy.splits_refusal`)."""

    def metrics(self) -> dict[str, Tensor]:
        """Detached on-device scalars to log under train/<name> for the last step ({}: none)."""
        return {}


def normalise_spec(spec: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """`components` as {name: args}: true (or {}) switches a component on with its defaults, false/null leaves it off."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise OptionsError("components", f"expected a mapping of component names to their options, got "
                                         f"{type(spec).__name__} {spec!r}; write e.g. components.ctkd=true")
    out: dict[str, dict[str, Any]] = {}
    for name, args in spec.items():
        if args is False or args is None:
            continue
        if args is True:
            args = {}
        if not isinstance(args, Mapping):
            raise OptionsError(f"components.{name}", f"expected true, false or a mapping of its options, got "
                                                     f"{args!r}")
        out[str(name)] = dict(args)
    return out


def build_components(spec: Mapping[str, Any] | None, facts: "RunFacts | None" = None) -> list[Component]:
    """The components `spec` switches on, in its order, each with its resolved options."""
    built = []
    for name, args in normalise_spec(spec).items():
        cls = COMPONENTS.get(name)
        built.append(cls(cls.resolve_options(args, f"components.{name}"), facts))
    return built
