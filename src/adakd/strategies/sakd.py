"""SAKD: Song, Chen, Ye and Song, "Spot-adaptive Knowledge Distillation" (IEEE TIP 2022).

A lightweight policy decides, per sample and per candidate spot, whether the student is distilled there. The
policy (with adaptation layers) is trained through a routing ("graft") forward that mixes teacher and student
segments by those decisions; the student is trained on CE plus the masked KD/KL terms. Implements the adakd
specification specs/sakd.md (sections cited as §n); [P] is the paper, [C] the authors' code
zju-vipa/spot-adaptive-pytorch. Presets: `sakd` follows [P], `sakd-faithful` reproduces [C], `anti` and
`anti-faithful` are the Anti ablation of [P] Table VII (masks inverted), `sakd-trainable-teacher` and
`sakd-faithful-trainable-teacher` the trainable-teacher ablation of Table VIII. The other ablations live in
strategies/ablations.py.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.base import masked_mean, spot_name
from adakd.distillers.kd import kd_loss
from adakd.models.layers import kaiming_init
from adakd.models.stage_types import StagedOutput
from adakd.models.staged import StagedModel
from adakd.modes import eval_mode
from adakd.numerics import at_least_float32, cross_entropy_upcast
from adakd.ranks import is_distributed, rank, world_size
from adakd.strategies.adapters import build_adapter
from adakd.strategies.base import Figure, LossWeights, RunFacts, Strategy, split_task_and_distillation
from adakd.strategies.registry import register_strategy

GUMBEL_EPS = 1e-20  # [C] models/gs.py
DECISION_TAU = 5.0  # §13: the decision export samples at tau 5
# [C] configs `classify_weight` on CIFAR-100 (§12); every other method uses 1, and Tiny-ImageNet uses 2 throughout.
CIFAR100_ASYM_GAMMA = {"at": 2.0, "vid": 2.0, "rkd": 2.0}
# [C] helper/util.py `adjust_learning_rate_stage_agent`: the agent lr is lr_agent / 100 below this epoch (§10).
BOTH_SCRIPT_LOW_EPOCHS = 30


def sample_uniform(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """U(0, 1) for this rank's samples, drawn as one process would draw them for the global batch.

    Under DDP the loader deals the global batch out rank::world_size, so every rank draws the whole batch's values
    and keeps its own rows: the same sample gets the same noise whatever the number of processes.
    """
    if is_distributed():
        world = world_size()
        full = torch.rand((shape[0] * world, *shape[1:]), device=device, dtype=dtype)
        return full[rank()::world]
    return torch.rand(shape, device=device, dtype=dtype)


def gumbel_noise(like: Tensor) -> Tensor:
    """g = -log(-log(U + eps) + eps), U ~ Uniform(0, 1), on `like`'s device from the torch RNG (§6.1)."""
    uniform = sample_uniform(tuple(like.shape), like.device, like.dtype)
    return -torch.log(-torch.log(uniform + GUMBEL_EPS) + GUMBEL_EPS)


def gumbel_softmax_st(logits: Tensor, tau: float, noise: Tensor | None = None) -> Tensor:
    """Straight-through Gumbel-softmax over the last axis: one-hot forward, gradient of softmax((l + g) / tau).

    §6: the hard sample is argmax(l + g), independent of tau; the returned value is (hard - soft).detach() + soft.
    """
    noise = gumbel_noise(logits) if noise is None else noise
    soft = F.softmax((logits + noise) / tau, dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return (hard - soft).detach() + soft


def tau_at(step: int, total_steps: int, start: float, minimum: float, schedule: str) -> float:
    """Gumbel temperature at a 0-based global step: constant, or max(min, start * exp(-r t)) reaching min at the end.

    The exponential form is an adakd choice (§6.5): [P] says only "initially 5 and decays gradually"; this is the
    annealing of the Gumbel-softmax paper [P] cites, rescaled to start at 5.
    """
    if schedule == "constant":
        return start
    rate = math.log(start / minimum) / max(total_steps, 1)
    return max(minimum, start * math.exp(-rate * step))


def routing_loss(routed_ce: Tensor, student_ce: Tensor, logit_decisions: Tensor, weight: float = 1.0,
                 gamma: float = 1.0, hinge: bool = False) -> tuple[Tensor, Tensor]:
    """(L_route, hinge value) of §7 step 7, with host-free comparisons.

    r = CE(out); x gamma if r > s, then (tested afterwards) / gamma if r < s, s = CE(z_s) as a value ([C] train.py);
    L_route = weight * r + [hinge] max(0, B/2 - sum_b d_{b,K-1}), the hinge not averaged. The hinge passes no
    gradient at exactly B/2, as [C]'s Python `max(0, t)` does (§15.5).
    """
    student_ce = student_ce.detach()
    routed = routed_ce
    if gamma != 1.0:
        routed = torch.where(routed > student_ce, routed * gamma, routed)
        routed = torch.where(routed < student_ce, routed / gamma, routed)
    deficit = logit_decisions.shape[0] / 2 - logit_decisions.sum()
    hinge_value = torch.where(deficit > 0, deficit, torch.zeros_like(deficit))
    total = weight * routed + hinge_value if hinge else weight * routed
    return total, hinge_value


def both_script_agent_lr(epoch: int, scheduled: float, full: float) -> float:
    """The agent lr of [C] train_both.py at 1-based `epoch` (§10 `both_script`), from the standard schedule's value.

    [C] sets lr_agent / 100 in epochs < 30, leaves it there until a milestone has passed, then sets
    lr_agent * decay^passed, the standard value: a jump up to lr_agent / 10 at epoch 151 of the CIFAR recipe.
    `scheduled` is this epoch's standard value (or this function's own earlier result) and `full` the undecayed
    agent lr, so a value >= `full` means that no milestone has passed. With lr_decay 1 the lr stays at full / 100.
    """
    if epoch < BOTH_SCRIPT_LOW_EPOCHS or scheduled >= full:
        return full / 100
    return scheduled


def redraw_weights(model: nn.Module) -> None:
    """Random weights for a "scratch" teacher (§11): every layer's own reset, then the zoo's He-normal convs, unit BN.

    BatchNorm running statistics restart too. The few classifier-specific draws of some zoo builders (VGG's and
    MobileNetV2's N(0, 0.01) classifier, WRN's zero fc bias) are not repeated: they keep PyTorch's default.
    """
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    kaiming_init(model)


@dataclass(frozen=True)
class SpotLayout:
    """Where SAKD branches (§3): decision k < K-1 at the k-th branch spot pair, decision K-1 at the logits."""

    student_branches: list[int]
    teacher_branches: list[int]
    spot_decision: list[int]  # decision index of each distiller spot
    names: list[str]  # one per decision; the last is "logits"
    student_segments: list[tuple[int, int]]
    teacher_segments: list[tuple[int, int]]

    @property
    def num_decisions(self) -> int:
        """K."""
        return len(self.names)


def _segments(branches: list[int], num_stages: int) -> list[tuple[int, int]]:
    starts = [0] + [b + 1 for b in branches]
    ends = branches + [num_stages - 1]
    return list(zip(starts, ends))


def spot_layout(student: StagedModel, teacher: StagedModel, student_spots: list[int],
                teacher_spots: list[int]) -> SpotLayout:
    """Branch points from the distiller's spots: one decision per spot pair, plus the logits (§3 rules 1, 2, 5).

    The (student, teacher) spot pairs are the explicit spot map of §3 rule 3; they must increase together, so
    segment k of one network ends where segment k of the other does.
    """
    head_s, head_t = student.num_stages - 1, teacher.num_stages - 1
    if len(student_spots) != len(teacher_spots):
        raise ValueError(f"student spots {student_spots} and teacher spots {teacher_spots} differ in number")
    pairs = sorted({(s, t) for s, t in zip(student_spots, teacher_spots) if (s, t) != (head_s, head_t)})
    for (s, t) in pairs:
        if s == head_s or t == head_t:
            raise ValueError(f"spot pair (student {s}, teacher {t}) pairs the logits with a feature")
    for (s0, t0), (s1, t1) in zip(pairs, pairs[1:]):
        if not (s0 < s1 and t0 < t1):
            raise ValueError(f"SAKD needs student and teacher spots that increase together; got {pairs}")
    student_branches, teacher_branches = [p[0] for p in pairs], [p[1] for p in pairs]
    index = {pair: k for k, pair in enumerate(pairs)}
    decision = [index.get((s, t), len(pairs)) for s, t in zip(student_spots, teacher_spots)]
    names = [spot_name(student.stage_names, s) for s in student_branches] + ["logits"]
    return SpotLayout(student_branches, teacher_branches, decision, names,
                      _segments(student_branches, student.num_stages), _segments(teacher_branches, teacher.num_stages))


# Shares are fractions; autoscaling would stretch e.g. 0.985-1.0 over the whole axis and exaggerate small changes.
SHARE_YLIM = (0.0, 1.02)


class SpotMasked(Strategy):
    """Shared by SAKD and its ablations: per-sample, per-spot masks on the student's KD and KL terms (§8).

    Subclasses set `option_class` (a frozen dataclass) and `preset` (its overrides) and implement `decisions`.
    """

    figures = (Figure("spot_shares", "distilled share per spot (SAKD Fig. 3)", "share of samples distilled",
                      columns="/share/", ylim=SHARE_YLIM),)
    # Shares, policy probabilities and the Gumbel temperature: not loss terms.
    not_loss_columns = ("/share/", "/policy_p/", "train/gumbel")

    @classmethod
    def options_from_facts(cls, facts: RunFacts) -> dict[str, Any]:
        """The data's input size and channels, where the options measure shapes at them (the adapters)."""
        names = cls.option_names()
        channels, size = facts.input_shape[0], facts.input_shape[-1]
        return {k: v for k, v in (("input_size", size), ("input_channels", channels)) if k in names}

    def __init__(self, student: nn.Module, teacher: StagedModel | None, distiller, weights: LossWeights,
                 student_spots: list[int] | None = None, teacher_spots: list[int] | None = None,
                 facts: RunFacts | None = None, **options: Any) -> None:
        super().__init__(student, teacher, distiller, weights, student_spots, teacher_spots, facts, **options)
        if teacher is None or distiller is None:
            raise ValueError(f"{type(self).__name__} needs a teacher and a distiller (task=distill)")
        # The routing forward must bypass DDP: it never updates the student, so nothing is to be synchronised.
        self.student_module: StagedModel = getattr(student, "module", student)
        self.layout = spot_layout(self.student_module, teacher, self.student_spots, self.teacher_spots)
        self.student_preact = bool(getattr(distiller, "student_preact", False))
        self.teacher_preact = bool(getattr(distiller, "teacher_preact", False))
        # The engine freezes pre-trained distiller parts before it builds the strategy, so this list is final.
        self.head_params = [p for p in distiller.trainable_parameters() if p.requires_grad]
        # Set by SAKD's trainable-teacher ablation: the KL term reaches the teacher, whose parameters (outside
        # DDP) the student step trains and averages across ranks by hand.
        self.teacher_learns = False
        self.unsynced_params: list[nn.Parameter] = []

    def student_terms(self, student_out: StagedOutput, teacher_out: StagedOutput, targets: Tensor,
                      indices: Tensor, epoch: int, masks: Tensor) -> dict[str, Tensor]:
        """Weighted CE, masked KL (last decision) and masked distiller terms; `masks` is float 0/1 [B, K]."""
        logits = student_out.features[-1]
        terms = {"ce": self.ce_weight * cross_entropy_upcast(logits, targets)}
        temperature = self.step_temperature(logits, teacher_out.features[-1])
        with self.distilling_at(temperature):
            named = self.distiller_forward(
                self.select(student_out, self.student_spots, self.student_preact),
                self.select(teacher_out, self.teacher_spots, self.teacher_preact),
                targets,
                masks=[masks[:, k] for k in self.layout.spot_decision],
                indices=indices,
                epoch=epoch,
            )
        terms.update({name: self.weights.method * value for name, value in named.items()})
        if self.weights.kl > 0:
            kl = kd_loss(logits, teacher_out.features[-1], temperature,
                         detach_teacher=not self.teacher_learns, standardize=self.weights.kl_standardize)
            terms["kl"] = self.weights.kl * masked_mean(kl, masks[:, -1])
        return terms

    @property
    def ce_weight(self) -> float:
        """Weight of the student's CE term."""
        return self.weights.ce

    def head_anchor(self) -> Tensor | float:
        """0 * sum of the distiller's trainable parameters: a skipped spot's head still gets a (zero) gradient.

        Keeps DDP's every-parameter-has-a-gradient contract (§8.7) and matches [C], whose zero-filling
        `zero_grad` lets weight decay and momentum act on a head whose spot selected no sample.
        """
        return sum(p.sum() for p in self.head_params) * 0.0 if self.head_params else 0.0

    def share_terms(self, masks: Tensor) -> dict[str, Tensor]:
        """n_k / B per decision (the engine's batch-size weighting makes the epoch value sample-weighted, §13)."""
        shares = masks.detach().mean(dim=0)
        return {f"sakd/share/{name}": shares[k] for k, name in enumerate(self.layout.names)}

    def student_update(self, terms: dict[str, Tensor]) -> Tensor:
        """L_S = sum of terms; zero_grad, backward, step of the student optimiser; returns L_S.

        The CE terms are the task part, the masked distillation terms, the extra KL and the heads' zero anchor the
        distillation part (handed over apart when a component splits the gradients, DOT)."""
        loss = torch.stack(list(terms.values())).sum()
        task_loss, distill = split_task_and_distillation(terms)
        distill_loss = (distill if distill is not None else 0.0) + self.head_anchor()
        self.optimizer_step(self.optimizers["main"], task_loss,
                            distill_loss=distill_loss if torch.is_tensor(distill_loss) else None,
                            unsynced=self.unsynced_params)
        return loss


@dataclass(frozen=True)
class SAKDOptions:
    """SAKD's switches (§9). Defaults are the paper preset `sakd`; `sakd-faithful` overrides some of them."""

    input_size: int = 32
    """Square input resolution used to measure feature shapes for the adapters (the engine fills in the data's)."""
    input_channels: int = 3
    """Input channels for that measurement (the engine fills in the data's: 1 for grayscale sets)."""
    gumbel_tau: float = 5.0
    """Initial Gumbel temperature: [P] §IV-A.5 and [C] train.py both use 5."""
    gumbel_tau_schedule: str = "exp"
    """"exp": decay to `gumbel_tau_min` at the end of training (adakd form of [P]'s "decays gradually", §6.5);
    "constant": [C] (no annealing exists in the repository)."""
    gumbel_tau_min: float = 0.5
    """Final temperature of the "exp" schedule (the Gumbel-softmax paper's floor, §6.5)."""
    policy_bias_init: float = 0.0
    """+b on every decision's distil logit at initialisation, applied only when `homo` ([C] models/classifier.py
    and configs `kd_loss.homo`: b = 10); [P] Fig. 3 text: random initialisation, so 0 (§5.4)."""
    homo: bool = False
    """The pair is homogeneous in [C]'s configs (§5.4 lists them); an explicit value, never inferred."""
    routing_weight: float = 1.0
    """beta_3 of [P] Eq. 7 (§IV-A.5: 1)."""
    routing_asym_gamma: float | None = 1.0
    """gamma_r of [C] train.py (`classify_weight`): x gamma when the routed net is worse than the student, / gamma
    when better. 1 is a no-op ([P]); None takes [C]'s CIFAR-100 value per method (AT, VID, RKD 2, others 1, §12);
    Tiny-ImageNet runs of [C] use 2 for every method: set it explicitly."""
    routing_hinge: bool = False
    """Add max(0, B/2 - number routed to the teacher's classifier) to the routing loss ([C] train.py; not in [P])."""
    adapter: str = "conv1x1"
    """"conv1x1": [P] §III-A; "convreg": [C] models/util.py conv-BN-ReLU (§4)."""
    student_eval_in_routing: bool = True
    """The student runs in eval mode during the routing forward ([P] §III-D, [C])."""
    adapter_bn_mode: str = "train"
    """Mode of the adapters during routing: "train" ([C]; [P] silent) or "eval"."""
    agent_lr_scale: float = 0.5
    """Agent (policy + adapters) lr = student lr x this ([C] train.py; [P] gives none, §10)."""
    agent_weight_decay: float = 1e-3
    """Agent weight decay ([C] train.py, §10)."""
    invert_masks: bool = False
    """Anti ablation ([P] Table VII, [C] train_reverse.py): KD/KL apply where d = 0; the policy trains unchanged."""
    teacher_trainable: bool = False
    """Trainable-teacher ablation ([P] Table VIII "Pre-trained†", [C] train_both.py, §11): the teacher trains with
    the student, in train mode and in the student optimiser ("main"); its forward keeps gradients, the KD and KL
    terms reach it (teacher tensors not detached) and it learns its own CE term ("teacher_ce"). It runs in eval
    mode inside the routing forward, as the student does; its weights are checkpointed with the strategy."""
    teacher_init: str = "pretrained"
    """"pretrained": the engine's teacher weights; "scratch": redrawn at random before training ([P] Table VIII
    "Scratch†"; not in [C], whose loader always reads a checkpoint). Needs `teacher_trainable`."""
    teacher_train_student_loss: str = "standard"
    """Trainable teacher only: "standard": L_S = ce (CE(z_s) + CE(z_t)) + KL + KD (adakd reading of [P]);
    "both_script": [C] train_both.py multiplies both CE terms by gamma_r."""
    teacher_train_routing_loss: str = "standard"
    """Trainable teacher only: "standard": the routing loss of the other switches (beta_3 CE(out) in the paper
    preset); "both_script": gamma_r CE(out), no asymmetry, no hinge ([C] train_both.py)."""
    teacher_train_agent_lr: str = "standard"
    """Trainable teacher only: "standard": the schedule of §10; "both_script": lr_agent / 100 until a milestone
    has passed, then the standard value ([C] helper/util.py, §10; see `both_script_agent_lr`)."""
    teacher_train_bias_init: float = 0.0
    """Trainable teacher only: replaces `policy_bias_init` (still only when `homo`); [C] train_both.py applies none."""

    def __post_init__(self) -> None:
        choices = {"gumbel_tau_schedule": ("exp", "constant"), "adapter": ("conv1x1", "convreg"),
                   "adapter_bn_mode": ("train", "eval"), "teacher_init": ("pretrained", "scratch"),
                   "teacher_train_student_loss": ("standard", "both_script"),
                   "teacher_train_routing_loss": ("standard", "both_script"),
                   "teacher_train_agent_lr": ("standard", "both_script")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"strategy option {name} must be one of {allowed}, not {getattr(self, name)!r}")
        if not (0 < self.gumbel_tau_min <= self.gumbel_tau):
            raise ValueError("strategy options need 0 < gumbel_tau_min <= gumbel_tau")
        if self.teacher_init == "scratch" and not self.teacher_trainable:
            raise ValueError("strategy option teacher_init=scratch needs teacher_trainable=true (a frozen random "
                             "teacher teaches nothing); use strategy=sakd-trainable-teacher")

    def both_script(self, switch: str) -> bool:
        """Whether a trainable-teacher switch (`teacher_train_*`) is set to "both_script" and in effect."""
        return self.teacher_trainable and getattr(self, switch) == "both_script"


@register_strategy("sakd")
class SAKD(SpotMasked):
    """Spot-adaptive KD, paper preset: per-sample, per-spot routing decisions trained by a routing forward.

    Parameter groups: "main" (student + distiller heads, + the teacher when `teacher_trainable`) and "agent"
    (policy + adapters, half lr, wd 1e-3). The step's "loss" is the student loss L_S; the routing loss is logged
    as "sakd/route_total".
    """

    option_class = SAKDOptions

    @classmethod
    def needs_teacher_weights(cls, options: SAKDOptions) -> bool:
        """False for the scratch-teacher ablation, which redraws the teacher's weights."""
        return options.teacher_init != "scratch"

    def __init__(self, student: nn.Module, teacher: StagedModel | None, distiller, weights: LossWeights,
                 student_spots: list[int] | None = None, teacher_spots: list[int] | None = None,
                 facts: RunFacts | None = None, **options: Any) -> None:
        super().__init__(student, teacher, distiller, weights, student_spots, teacher_spots, facts, **options)
        opts = self.options
        size = (opts.input_channels, opts.input_size, opts.input_size)
        student_shapes = self.student_module.feature_shapes(size)
        teacher_shapes = teacher.feature_shapes(size)
        num = self.layout.num_decisions
        # Policy input: pooled teacher vector first, then the student's (§5.2).
        self.policy = self.own("policy", nn.Linear(teacher_shapes[-2][0] + student_shapes[-2][0], 2 * num), "agent")
        pairs = list(zip(self.layout.student_branches, self.layout.teacher_branches))
        self.adapters = self.own("adapters", nn.ModuleDict({
            "student_to_teacher": nn.ModuleList(
                build_adapter(opts.adapter, student_shapes[s], teacher_shapes[t]) for s, t in pairs),
            "teacher_to_student": nn.ModuleList(
                build_adapter(opts.adapter, teacher_shapes[t], student_shapes[s]) for s, t in pairs),
        }), "agent")
        bias = opts.teacher_train_bias_init if opts.teacher_trainable else opts.policy_bias_init
        if opts.homo and bias:
            with torch.no_grad():  # [C] edits the leaf in place outside no-grad, an error since PyTorch 1.8
                self.policy.bias[0::2] += bias
        reference = next(self.student_module.parameters())
        self.policy.to(reference.device, reference.dtype)
        self.adapters.to(reference.device, reference.dtype)
        self.agent_params = list(self.policy.parameters()) + list(self.adapters.parameters())
        self.agent_full_lr: list[float] = []
        gamma = opts.routing_asym_gamma
        self.asym_gamma = CIFAR100_ASYM_GAMMA.get(distiller.name, 1.0) if gamma is None else float(gamma)
        if opts.teacher_trainable:
            # The engine hands over a frozen view; this ablation trains an unfrozen view of the same modules.
            # After the policy and adapters, so that those draw the same initial weights as without it.
            self.teacher = StagedModel(teacher.model)
            if opts.teacher_init == "scratch":
                redraw_weights(self.teacher.model)
            self.teacher.model.requires_grad_(True)
            self.teacher_learns = True
            self.distiller.detach_teacher = False
            self.unsynced_params = list(self.teacher.model.parameters())

    @property
    def ce_weight(self) -> float:
        """Weight of each CE term: x gamma_r under `teacher_train_student_loss=both_script` ([C] train_both.py)."""
        gamma = self.asym_gamma if self.options.both_script("teacher_train_student_loss") else 1.0
        return self.weights.ce * gamma

    def param_groups(self) -> dict[str, Any]:
        """The student group ("main", as in Standard, with a trained teacher) and the agent group (own lr, decay)."""
        groups = super().param_groups()  # "agent": the policy's and the adapters' parameters (owned)
        groups["main"] = groups["main"] + self.unsynced_params
        groups["agent"] = {"params": groups["agent"], "lr_scale": self.options.agent_lr_scale,
                           "weight_decay": self.options.agent_weight_decay}
        return groups

    def attach(self, optimizers: dict[str, torch.optim.Optimizer], precision, total_steps: int = 1,
               clip_grad_norm: float | None = None, accumulate: int = 1) -> None:
        """Strategy.attach, noting the agent's undecayed lr (freshly built optimisers hold it) for both_script."""
        super().attach(optimizers, precision, total_steps, clip_grad_norm, accumulate)
        agent = optimizers.get("agent")
        self.agent_full_lr = [group["lr"] for group in agent.param_groups] if agent is not None else []

    def train(self, mode: bool = True) -> None:
        """Student, distiller, policy and adapters follow `mode`; the teacher stays in eval unless it trains."""
        super().train(mode)
        if self.teacher_learns:
            self.teacher.train(mode)

    def state_dict(self) -> dict[str, Any]:
        """Distiller heads, policy, adapters ([C] saves no adapters; exact resume needs them, §13), trained teacher."""
        state = super().state_dict()
        if self.teacher_learns:
            state["teacher"] = self.teacher.model.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` strictly."""
        super().load_state_dict(state)
        if self.teacher_learns:
            self.teacher.model.load_state_dict(state["teacher"], strict=True)
        elif "teacher" in state:
            raise ValueError("checkpoint holds a trained teacher but this run's teacher is frozen; resume it with "
                             "strategy.args.teacher_trainable=true")

    def set_agent_lr(self, epoch: int) -> None:
        """Apply `teacher_train_agent_lr=both_script` over the lr that the engine's schedule set for `epoch`."""
        for group, full in zip(self.optimizers["agent"].param_groups, self.agent_full_lr):
            group["lr"] = both_script_agent_lr(epoch, group["lr"], full)

    def tau(self, step: int) -> float:
        """Gumbel temperature at a 0-based global step."""
        opts = self.options
        return tau_at(step, self.total_steps, opts.gumbel_tau, opts.gumbel_tau_min, opts.gumbel_tau_schedule)

    def policy_logits(self, teacher_out: StagedOutput, student_out: StagedOutput) -> Tensor:
        """l [B, K, 2] from the detached pooled vectors, teacher first; channel 0 = distil (§5)."""
        inputs = torch.cat([teacher_out.features[-2].detach(), student_out.features[-2].detach()], dim=1)
        return self.policy(inputs).view(inputs.shape[0], self.layout.num_decisions, 2)

    def route(self, images: Tensor, decisions: Tensor, teacher_out: StagedOutput | None = None) -> Tensor:
        """The routing ("graft") forward of §7.1: logits of the network mixed per sample by `decisions` [B, K].

        `teacher_out`, the frozen teacher's forward on the same `images`, supplies the output of the teacher's
        first segment instead of running it again (the same eval-mode computation, so the same numbers).
        """
        student, teacher = self.student_module, self.teacher
        # [C] train_both.py routes through a learning teacher in eval mode, as through the student.
        to_eval = [student] if self.options.student_eval_in_routing else []
        to_eval += [teacher] if self.teacher_learns else []
        to_teacher, to_student = self.adapters["student_to_teacher"], self.adapters["teacher_to_student"]
        last = self.layout.num_decisions - 1
        u_s = u_t = images
        with eval_mode(*to_eval):
            self.adapters.train(self.options.adapter_bn_mode == "train")
            for k, ((b_s, e_s), (b_t, e_t)) in enumerate(zip(self.layout.student_segments,
                                                             self.layout.teacher_segments)):
                # Nothing upstream of the first segments is trained by the routing loss, so they need no graph;
                # from the second on, the adapters upstream need gradients through both networks' segments.
                with torch.no_grad() if k == 0 else contextlib.nullcontext():
                    o_s = student(u_s, b_s, e_s).features[-1]
                    if k == 0 and teacher_out is not None and not self.teacher_learns:
                        o_t = teacher_out.features[e_t]
                    else:
                        # The unbound StagedModel forward skips the frozen teacher's no-grad; its weights still get
                        # no gradient: they do not require grad.
                        o_t = StagedModel.forward(teacher, u_t, b_t, e_t).features[-1]
                d = decisions[:, k].to(o_s.dtype).view(-1, *([1] * (o_s.dim() - 1)))
                if k == last:
                    return (1 - d) * o_s + d * o_t
                u_t = (1 - d) * to_teacher[k](o_s) + d * o_t
                u_s = (1 - d) * o_s + d * to_student[k](o_t)
        raise AssertionError("unreachable: the last segment returns")

    def route_loss(self, route_ce: Tensor, student_ce: Tensor, logit_decisions: Tensor) -> tuple[Tensor, Tensor]:
        """(L_route, hinge value): §7 step 7 with this run's switches, or [C] train_both.py's gamma_r CE(out)."""
        opts = self.options
        if opts.both_script("teacher_train_routing_loss"):
            return routing_loss(route_ce, student_ce, logit_decisions, weight=self.asym_gamma)
        return routing_loss(route_ce, student_ce, logit_decisions, opts.routing_weight, self.asym_gamma,
                            opts.routing_hinge)

    def student_terms(self, student_out: StagedOutput, teacher_out: StagedOutput, targets: Tensor,
                      indices: Tensor, epoch: int, masks: Tensor) -> dict[str, Tensor]:
        """SpotMasked's terms, plus the trained teacher's own CE ("teacher_ce", weighted like the student's)."""
        terms = super().student_terms(student_out, teacher_out, targets, indices, epoch, masks)
        if self.teacher_learns:
            terms["teacher_ce"] = self.ce_weight * cross_entropy_upcast(teacher_out.features[-1], targets)
        return terms

    def masks_from(self, decisions: Tensor) -> Tensor:
        """Float 0/1 student-loss masks [B, K] from hard decisions (inverted for the Anti ablation)."""
        selected = decisions.detach() > 0.5
        if self.options.invert_masks:
            selected = ~selected
        # The decisions' dtype (float32 under autocast, float64 in a float64 run): exact 0/1 either way.
        return selected.to(torch.promote_types(decisions.dtype, torch.float32))

    def agent_update(self, loss: Tensor) -> None:
        """zero_grad, backward of L_route into the agent parameters only, step (§7 step 9's cheaper equivalent)."""
        params = self.agent_params
        # The agent is not wrapped in DDP (averaged here: every rank must keep the same policy); the student step
        # that follows updates the loss scale.
        self.optimizer_step(self.optimizers["agent"], loss, inputs=params, unsynced=params, update=False)

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """§7 in order: teacher, student, policy + Gumbel, masked student terms, routing, agent then student step."""
        tau = self.tau(step)
        both_script_lr = self.options.both_script("teacher_train_agent_lr")
        if both_script_lr:
            self.set_agent_lr(epoch)
        with self.precision.autocast():
            teacher_out = self.teacher(images, preact=self.teacher_preact)
            student_out = self.student(images, preact=self.student_preact)
            policy_logits = at_least_float32(self.policy_logits(teacher_out, student_out))
            decisions = gumbel_softmax_st(policy_logits, tau)[..., 0]
            masks = self.masks_from(decisions)
            terms = self.student_terms(student_out, teacher_out, targets, indices, epoch, masks)
            routed = self.route(images, decisions, teacher_out)
            route_ce = cross_entropy_upcast(routed, targets)
            student_ce = cross_entropy_upcast(student_out.features[-1].detach(), targets)
            route_total, hinge = self.route_loss(route_ce, student_ce, decisions[:, -1])
        self.agent_update(route_total)
        loss = self.student_update(terms)
        out = {name: value.detach() for name, value in terms.items()}
        out.update(self.share_terms(masks))
        out.update(self.component_metrics())
        probs = policy_logits.detach().softmax(dim=-1)[..., 0].mean(dim=0)
        out.update({f"sakd/policy_p/{name}": probs[k] for k, name in enumerate(self.layout.names)})
        out["sakd/route_ce"] = route_ce.detach()
        out["sakd/route_total"] = route_total.detach()
        out["sakd/hinge"] = hinge.detach()
        out["gumbel/tau"] = torch.full((), tau, device=loss.device)
        if both_script_lr:  # the engine logs lr/agent before the first step overrides it
            out["sakd/agent_lr"] = torch.full((), self.optimizers["agent"].param_groups[0]["lr"], device=loss.device)
        if self.teacher_learns:
            out["sakd/teacher_acc1"] = 100 * (teacher_out.features[-1].detach().argmax(dim=1) == targets).float().mean()
        out["loss"] = loss.detach()
        out["correct"] = (student_out.features[-1].detach().argmax(dim=1) == targets).sum()
        return out

    def decision_names(self) -> list[str]:
        """Spot names of the K decisions, the last being "logits"."""
        return list(self.layout.names)

    @torch.no_grad()
    def decide(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(hard decisions d [B, K] as float 0/1, softmax(l)[:, :, 0] [B, K]) in eval mode, Gumbel at tau 5 (§13).

        d = 1 means "routed to the teacher" (distilled in adaptive runs); masks are not inverted here.
        """
        student, teacher = self.student_module, self.teacher
        with eval_mode(student, self.policy, teacher):
            logits = at_least_float32(self.policy_logits(teacher(images), student(images)))
            decisions = gumbel_softmax_st(logits, DECISION_TAU)[..., 0] > 0.5
            return decisions.to(logits.dtype), logits.softmax(dim=-1)[..., 0]


@register_strategy("sakd-faithful")
class SAKDFaithful(SAKD):
    """SAKD as the released code runs it: constant tau 5, bias +10 for homogeneous pairs, asymmetric rule, hinge,
    conv-BN-ReLU adapters (§9)."""

    preset = {"gumbel_tau_schedule": "constant", "policy_bias_init": 10.0, "routing_asym_gamma": None,
              "routing_hinge": True, "adapter": "convreg",
              # In effect only with teacher_trainable ([C] train_both.py, §9).
              "teacher_train_student_loss": "both_script", "teacher_train_routing_loss": "both_script",
              "teacher_train_agent_lr": "both_script"}


@register_strategy("anti")
class Anti(SAKD):
    """Anti ablation ([P] Table VII): the adaptive step with every student mask inverted (§11)."""

    preset = {"invert_masks": True}


@register_strategy("anti-faithful")
class AntiFaithful(SAKDFaithful):
    """Anti on the released code's switches ([C] train_reverse.py): sakd-faithful with every student mask inverted."""

    preset = {**SAKDFaithful.preset, "invert_masks": True}


@register_strategy("sakd-trainable-teacher")
class SAKDTrainableTeacher(SAKD):
    """[P] Table VIII "Pre-trained†" on the paper's switches: the teacher trains with the student (§11).

    `strategy.args.teacher_init=scratch` gives "Scratch†".
    """

    preset = {"teacher_trainable": True}


@register_strategy("sakd-faithful-trainable-teacher")
class SAKDFaithfulTrainableTeacher(SAKDFaithful):
    """[C] train_both.py: sakd-faithful with a trained teacher, gamma_r on both CE terms and on the routing CE (no
    asymmetry, no hinge), no policy bias, the both_script agent lr (§9, §11)."""

    preset = {**SAKDFaithful.preset, "teacher_trainable": True}
