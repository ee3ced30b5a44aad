"""ABL stage 1 (`abl-search`): the bilevel search for gamma on a held-out split, and how it is sized and reported."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
import yaml
from torch import Tensor

from adakd.modes import eval_mode
from adakd.strategies.abl import BLOCK_ACCURACY, STUDENT_WEIGHTS, ABLBase
from adakd.strategies.abl_blocks import (Components, average_across_ranks, cross_entropy_upcast, forward_blocks,
                                         preserved, sgd_next)
from adakd.strategies.abl_options import META_LR_CAP, META_STEPS_FLOOR, PAPER_RUN_STEPS, ABLOptions
from adakd.strategies.base import Band, Figure
from adakd.strategies.registry import register_strategy


def search_warning(opts: "ABLOptions") -> str | None:
    """One line when the search makes fewer gamma updates than the floor or steps gamma faster than the cap."""
    if opts.meta_steps >= META_STEPS_FLOOR and opts.meta_lr <= META_LR_CAP * (1 + 1e-9):  # 3e-4 / 0.005 rounds up
        return None
    plan = opts.search_plan or {}
    scale = plan.get("search_scale", "auto")
    forced = [f"search_scale={scale:g}"] if scale not in ("auto", 1) else []
    forced += [f"{name}={plan['given'][name]:g}" for name in ("meta_steps", "meta_lr")
               if plan.get("given", {}).get(name) is not None]
    return (f"ABL search: with {', '.join(forced) or 'these options'} it makes {opts.meta_steps} gamma update(s) "
            f"(floor {META_STEPS_FLOOR}) at meta_lr {opts.meta_lr:.3g} (cap {META_LR_CAP:.3g}): too few updates, or each "
            "too large (p1 can saturate in one), for the searched p to mean much. Leave strategy.args.search_scale "
            f"at auto (the default, which keeps >= {META_STEPS_FLOOR} updates and meta_lr <= {META_LR_CAP:.3g}) "
            f"and unset meta_steps and meta_lr, or give meta_steps >= {META_STEPS_FLOOR} and meta_lr <= "
            f"{META_LR_CAP:.3g}")


def search_record(opts: "ABLOptions") -> dict[str, Any]:
    """What stage 1 ran with, for gamma.json: search_scale as given, the scale S it resolved to, and the counts."""
    plan = opts.search_plan or {}
    return {"search_scale": plan.get("search_scale", opts.search_scale), "scale": plan.get("scale"),
            "run_steps": plan.get("run_steps"), "paper_run_steps": PAPER_RUN_STEPS,
            "warm_steps": opts.warm_steps, "meta_steps": opts.meta_steps, "meta_every": opts.meta_every,
            "meta_lr": opts.meta_lr, "early_stop_window": opts.early_stop_window, "log_every": opts.log_every,
            "meta_steps_floor": META_STEPS_FLOOR, "meta_lr_cap": META_LR_CAP}


def describe_search(opts: "ABLOptions") -> str:
    """One line saying how stage 1 was sized: the scale, where it came from, the counts and meta_lr."""
    plan = opts.search_plan or {}
    scale, run_steps = plan.get("search_scale", opts.search_scale), plan.get("run_steps")
    if scale != "auto":
        source = f"search_scale={scale:g} (given)"
    elif run_steps is None:
        source = "search_scale=auto, S = 1 (the run's length unknown: the paper's search)"
    else:
        source = (f"search_scale=auto, S = {plan['scale']:.3g} (a final run of {run_steps:,} steps, the paper's "
                  f"{PAPER_RUN_STEPS:,}{'; longer runs keep its counts' if run_steps > PAPER_RUN_STEPS else ''})")
    floor = " (the floor)" if scale == "auto" and opts.meta_steps == META_STEPS_FLOOR else ""
    cap = " (the cap)" if scale == "auto" and opts.meta_lr == META_LR_CAP else ""
    return (f"ABL search: {source}: {opts.warm_steps:,} warm-start steps, then up to {opts.meta_steps:,} gamma "
            f"updates{floor} at meta_lr {opts.meta_lr:.3g}{cap}, stopping early once p1 moves less than "
            f"{opts.early_stop_delta:g} over {opts.early_stop_window:,} update(s); {steps_budget(opts):,} steps at most")


def steps_budget(options: ABLOptions) -> int:
    """Iterations stage 1 needs at most: the warm start plus meta_steps updates every meta_every steps."""
    return options.warm_steps + options.meta_steps * options.meta_every


def configured_warm_steps(run_dir: str | Path) -> int | None:
    """The run's warm start in steps: what its gamma.json recorded, else strategy.args.warm_steps over its options'
    default; None if unknown."""
    from adakd import strategies
    from adakd.registry import UnknownNameError

    try:  # what the search recorded it ran with (search_scale=auto sizes it from the data, unknown to the config)
        ran = json.loads((Path(run_dir) / "gamma.json").read_text()).get("search", {}).get("warm_steps")
        if isinstance(ran, int) and not isinstance(ran, bool):
            return ran
    except (OSError, ValueError, AttributeError):
        pass
    path = Path(run_dir) / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None  # the figure falls back to the first meta row
    strategy = values.get("strategy") if isinstance(values, dict) else None
    if not isinstance(strategy, dict) or not isinstance(strategy.get("name"), str):
        return None
    try:
        cls = strategies.get(strategy["name"])
    except UnknownNameError:
        return None
    if "warm_steps" not in cls.option_names():
        return None
    # Resolved as the run resolved it (the user's args over the class preset over the defaults, the options' own
    # rules such as search_scale applied), so the figure shows the warm start the run used.
    try:
        options = cls.resolve_options(strategy.get("args") or {})
    except (TypeError, ValueError):
        return None
    value = options.warm_steps
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# [A] Fig. 3: p1 per block at every logged step of abl_gamma.csv. Meta rows are logged only every log_every gamma
# updates, so the first one is a late estimate of the warm start's end, used only when the run does not say.
GAMMA_TRAJECTORIES = Figure(
    "gamma_trajectories", "ABL student weight per block (ABL Fig. 3)", "student weight p1 (p2 = 1 - p1)",
    columns=r"^p1/.*block\d+$", kind="steps", source="abl_gamma.csv", x="step", xlabel="training step",
    by_block=True, label="last", band=Band("warm start", end=configured_warm_steps, until=("phase", "meta")))


@register_strategy("abl-search")
class ABLSearch(ABLBase):
    """Stage 1 (§6): warm start at gamma = 0, then alternating gamma (held-out split) and weight updates."""

    # What it writes into the run folder: the gamma rows (drain_records) and gamma.json (artifacts).
    run_files: ClassVar[tuple[str, ...]] = ("abl_gamma.csv", "gamma.json")
    figures: ClassVar[tuple[Figure, ...]] = (STUDENT_WEIGHTS, GAMMA_TRAJECTORIES, BLOCK_ACCURACY)
    # Each gamma update looks one real SGD step ahead of the weights, so every micro-batch must be a step.
    accumulates: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opts = self.options
        self.gamma = torch.zeros(self.num_blocks - 1, 2, device=self.p.device, dtype=self.meta_dtype,
                                 requires_grad=True)
        self.meta_optimizer = torch.optim.Adam([self.gamma], lr=opts.meta_lr, betas=tuple(opts.meta_betas),
                                               weight_decay=opts.meta_weight_decay)
        self.meta_done = 0  # gamma updates so far (= validation batches consumed)
        self.stopped_early = False
        self.checkpoints_p1: list[tuple[int, list[float]]] = []  # (meta step, p1) at each log point
        self.records: list[dict[str, Any]] = []
        self.last_hyper: Tensor | None = None
        self.last_diff: Tensor | None = None
        # Lines the engine prints when the run starts: how the search was sized, and a warning if it is degenerate.
        self._notices: list[tuple[str, bool]] = [(describe_search(opts), False)]
        warning = search_warning(opts)
        if warning:
            self._notices.append((warning, True))

    def start_notices(self) -> list[tuple[str, bool]]:
        """How the search was sized, and a warning when it is degenerate."""
        return list(self._notices)

    def initial_p(self) -> Tensor:
        return torch.full((self.num_blocks - 1, 2), 0.5, dtype=self.meta_dtype)

    def current_p(self) -> Tensor:
        return self.gamma.detach().softmax(dim=1)

    @property
    def max_steps(self) -> int:
        """Iterations stage 1 needs at most (the engine runs enough epochs for them)."""
        return steps_budget(self.options)

    @classmethod
    def validation_fraction(cls, options: ABLOptions) -> float:
        """Share of the training set held out for gamma (§6.1)."""
        return options.val_fraction

    @property
    def validation_batches_used(self) -> int:
        """Held-out batches consumed so far (one per gamma update)."""
        return self.meta_done

    def attach_validation(self, batches: Iterator) -> None:
        """The endless stream of validation batches (the engine positions it after `meta_done` batches)."""
        self.val_batches = batches

    def searching(self, step: int) -> bool:
        """Whether this 0-based global step updates gamma."""
        opts = self.options
        if self.stopped_early or self.meta_done >= opts.meta_steps or step < opts.warm_steps:
            return False
        return (step - opts.warm_steps) % opts.meta_every == 0

    def should_stop(self) -> bool:
        """True once the bilevel phase has run its meta steps or p has settled (§12 row 13)."""
        return self.stopped_early or self.meta_done >= self.options.meta_steps

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """§6.3: components on B_tr, then (meta steps) virtual step, L_val, hypergradient, gamma step; real step.

        Steps without a gamma update (warm start, meta_every > 1, after the search) take the fused step.
        """
        searching = self.searching(step)
        if not searching:
            out = super().training_step(images, targets, indices, epoch, step)
            if step < self.options.warm_steps and step % self.options.log_every == 0:
                self.record(step, epoch, "warm")
            return out
        if self.val_batches is None:
            raise RuntimeError("abl-search needs validation batches: the engine calls attach_validation")
        parts = self.components(images, targets, indices, epoch)
        val_images, val_targets, val_indices = next(self.val_batches)
        self.meta_step(parts, val_images, val_targets, val_indices, epoch)
        p = self.current_p()
        self.apply(self.combined(parts, p))
        # The last gamma update is always logged: a search shorter than log_every updates still has its curve.
        if self.meta_done % self.options.log_every == 0 or self.meta_done == self.options.meta_steps:
            self.record(step, epoch, "meta", parts)
        return self.step_output(parts.terms, parts.logits, p, targets)

    def meta_step(self, parts: Components, images: Tensor, targets: Tensor, indices: Tensor, epoch: int) -> None:
        """One gamma update by the hypergradient of §6.4 (or §6.6's finite differences)."""
        hyper, diff = self.hypergradient(parts, images, targets, indices, epoch)
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.gamma.grad = hyper
        if self.options.meta_grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([self.gamma], self.options.meta_grad_clip)
        self.meta_optimizer.step()
        self.meta_done += 1
        self.last_hyper, self.last_diff = hyper.detach(), diff.detach()

    def virtual_weights_for(self, parts: Components, p: Tensor) -> tuple[list[Tensor], list[Tensor], list[float]]:
        """(parameters, w' = their next SGD iterate under p, dw'/dg per parameter) for every trained parameter."""
        optimizer = self.optimizers["main"]
        lookup = {id(param): group for group in optimizer.param_groups for param in group["params"]}
        params, nexts, jacobians = [], [], []
        for param, grad in self.combined(parts, p):
            if grad is None:
                continue  # SGD skips a parameter without a gradient
            w_next, jac = sgd_next(param.detach(), grad, lookup[id(param)], optimizer.state.get(param, {}))
            params.append(param)
            nexts.append(w_next)
            jacobians.append(jac)
        return params, nexts, jacobians

    def validation_loss(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                        gamma: Tensor | None = None) -> Tensor:
        """L_val at the current weights on one validation batch (§6.5); BN follows `val_bn`."""
        opts = self.options
        alpha = self.weights.ce
        modules = [self.student_module, self.heads]
        # val_bn "train" keeps the modes as they are; eval_mode() with no module then changes nothing.
        with eval_mode(*(modules if opts.val_bn == "eval" else [])):
            with self.precision.autocast():
                # Undetached: v is the gradient of L_val through the whole network.
                forward = forward_blocks(self.student_module, self.plan, images, self.student_preact)
                logits = forward.output.features[-1]
                ce = cross_entropy_upcast(logits, targets)
                if opts.val_objective == "ce":
                    return ce  # §6.5: plain CE; alpha * CE would scale the hypergradient by alpha
                loss = alpha * ce
                teacher_out = self.teacher(images, preact=self.teacher_preact)
                kd = self.kd_terms(forward.output, teacher_out, targets, indices, epoch)
                kd_total = torch.stack(list(kd.values())).sum() if kd else torch.zeros((), device=images.device)
                loss = loss + kd_total
                if opts.val_objective == "composite":
                    p = (self.gamma if gamma is None else gamma).softmax(dim=1)
                    for l, (head, h) in enumerate(zip(self.heads, forward.block_outputs[:-1])):
                        local = cross_entropy_upcast(head(h), targets)
                        loss = loss + p[l, 0] * alpha * local + p[l, 1] * kd_total
                return loss

    @contextlib.contextmanager
    def at_weights(self, params: list[Tensor], values: list[Tensor]) -> Iterator[None]:
        """Run the body with `params` set to `values`; weights and BatchNorm statistics restored bit for bit after."""
        with preserved([self.student_module, self.heads, self.distiller], params):
            with torch.no_grad():
                for param, value in zip(params, values):
                    param.copy_(value)
            yield

    def heads_follow_gamma(self) -> bool:
        """Whether w' of the auxiliary heads depends on gamma and L_val depends on the heads.

        With aux_grad=weighted the head update is p1 * alpha * c_l, and the composite L_val evaluates the heads at
        w'; then the hypergradient needs v_phi = dL_val/dphi' too (the other objectives never run the heads).
        """
        return self.options.aux_grad == "weighted" and self.options.val_objective == "composite"

    def validation_gradient(self, params: list[Tensor], nexts: list[Tensor], images: Tensor, targets: Tensor,
                            indices: Tensor, epoch: int) -> dict[int, Tensor | None]:
        """v = dL_val/dw' at w' for every weight whose update depends on gamma (by parameter id), plus the explicit
        dL_val/dgamma: the non-last blocks, and the heads when `heads_follow_gamma`.

        The weights are set to w' in place and restored bit for bit, BatchNorm statistics included (§13 item 8).
        """
        wanted_ids = {id(q) for block in self.block_params[:-1] for q in block}
        if self.heads_follow_gamma():
            wanted_ids |= {id(q) for head in self.head_params for q in head}
        wanted = [q for q in params if id(q) in wanted_ids]
        composite = self.options.val_objective == "composite"
        with self.at_weights(params, nexts):
            loss = self.validation_loss(images, targets, indices, epoch)
            grads = torch.autograd.grad(loss, wanted + ([self.gamma] if composite else []), allow_unused=True)
        v: dict[int, Tensor | None] = {id(q): g for q, g in zip(wanted, grads)}
        v["explicit"] = grads[-1] if composite else None  # type: ignore[index]
        return v

    @torch.no_grad()
    def validation_loss_at(self, parts: Components, gamma: Tensor, images: Tensor, targets: Tensor,
                           indices: Tensor, epoch: int = 1) -> float:
        """L_val(w'(gamma), gamma) as a number, for checking the hypergradient by finite differences."""
        params, nexts, _ = self.virtual_weights_for(parts, gamma.softmax(dim=1))
        with self.at_weights(params, nexts):
            return float(self.validation_loss(images, targets, indices, epoch, gamma=gamma))

    def hypergradient(self, parts: Components, images: Tensor, targets: Tensor, indices: Tensor,
                      epoch: int) -> tuple[Tensor, Tensor]:
        """(dL_val/dgamma [L - 1, 2], s1 - s2 per block) at w' = the virtual SGD step under the current p."""
        p = self.current_p()
        params, nexts, jacobians = self.virtual_weights_for(parts, p)
        v = self.validation_gradient(params, nexts, images, targets, indices, epoch)
        explicit = v.pop("explicit")  # type: ignore[call-overload]
        average_across_ranks([g for g in v.values() if g is not None] + ([explicit] if explicit is not None else []))
        jac = {id(q): j for q, j in zip(params, jacobians)}
        last = self.num_blocks - 1
        s1 = torch.zeros(last, dtype=torch.float64, device=p.device)
        s2 = torch.zeros_like(s1)
        alpha = self.weights.ce
        if self.options.hypergrad == "exact":
            for l in range(last):
                for q, a, b in zip(self.block_params[l], parts.a[l], parts.b[l]):
                    g = v.get(id(q))
                    if g is None:
                        continue
                    # dw'/dg (SGD's lr, times a momentum factor under Nesterov) is folded in here.
                    if a is not None:
                        s1[l] += jac[id(q)] * (a.double() * g.double()).sum()
                    if b is not None:
                        s2[l] += jac[id(q)] * (b.double() * g.double()).sum()
                # aux_grad=weighted: g_phi_l = p1 alpha c_l enters w' like p1 a_l, so with v_phi = dL_val/dphi'_l
                # (non-zero only under the composite objective) dL_val/dgamma1 gains -lr p1 p2 alpha <c_l, v_phi>.
                for q, c in zip(self.head_params[l] if self.heads_follow_gamma() else [], parts.c[l]):
                    g = v.get(id(q))
                    if g is not None and c is not None:
                        s1[l] += jac[id(q)] * alpha * (c.double() * g.double()).sum()
        else:
            s1, s2 = self.finite_difference(parts, v, jac)
        p64 = p.double()
        weight = p64[:, 0] * p64[:, 1] * (s1 - s2)
        hyper = torch.stack([-weight, weight], dim=1).to(self.gamma.dtype)
        if explicit is not None:
            hyper = hyper + explicit
        return hyper, (s1 - s2).float()

    @torch.no_grad()
    def finite_difference(self, parts: Components, v: dict[int, Tensor | None],
                          jac: dict[int, float]) -> tuple[Tensor, Tensor]:
        """§6.6 block-wise central differences of the local and KD losses along v on the training batch (Eq. 10)."""
        targets, indices, epoch = parts.batch
        last = self.num_blocks - 1
        vectors = [g for g in v.values() if g is not None]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in vectors)) if vectors else torch.tensor(0.0)
        s1 = torch.zeros(last, dtype=torch.float64, device=self.p.device)
        s2 = torch.zeros_like(s1)
        if float(norm) == 0.0:
            return s1, s2
        xi = self.options.fd_xi / float(norm)
        alpha = self.weights.ce
        forward = parts.forward
        for l in range(last):
            # Head l moves with block l when its update is p1 alpha c_l (`heads_follow_gamma`): the local loss is
            # then differentiated along (v_theta, v_phi) together, which adds alpha <c_l, v_phi> to s1; K and s2
            # do not depend on the heads.
            heads = self.head_params[l] if self.heads_follow_gamma() else []
            params = [q for q in list(self.block_params[l]) + list(heads) if v.get(id(q)) is not None]
            if not params:
                continue
            # The step direction is dw'/dg * v; jac is per parameter (a scalar for SGD).
            values = {}
            with preserved([self.student_module, self.heads, self.distiller], params):
                for sign in (1.0, -1.0):
                    for q in params:
                        q.add_(sign * xi * jac[id(q)] * v[id(q)])
                    x = forward.block_inputs[l]
                    out = forward_blocks(self.student_module, self.plan, x, self.student_preact, start=l,
                                         cached=forward.output)
                    local = cross_entropy_upcast(self.heads[l](out.block_outputs[0]), targets)
                    kd = self.kd_terms(out.output, parts.teacher_out, targets, indices, epoch)
                    kd_total = torch.stack(list(kd.values())).sum() if kd else torch.zeros(())
                    values[sign] = (local.double(), kd_total.double())
                    for q in params:
                        q.sub_(sign * xi * jac[id(q)] * v[id(q)])
            s1[l] = alpha * (values[1.0][0] - values[-1.0][0]) / (2 * xi)
            s2[l] = (values[1.0][1] - values[-1.0][1]) / (2 * xi)
        return s1, s2

    def record(self, step: int, epoch: int, phase: str, parts: Components | None = None) -> None:
        """One row of abl_gamma.csv (Fig. 3; with `parts`, Fig. 5's mean |a_l|, |b_l|) and the early-stopping check."""
        p = self.current_p().cpu()
        row: dict[str, Any] = {"step": step, "epoch": epoch, "phase": phase, "meta_step": self.meta_done}
        names = self.block_names[:-1]
        row.update({f"p1/{n}": float(p[l, 0]) for l, n in enumerate(names)})
        row.update({f"p2/{n}": float(p[l, 1]) for l, n in enumerate(names)})
        if self.last_hyper is not None:
            hyper, diff = self.last_hyper.cpu(), self.last_diff.cpu()
            row.update({f"hypergrad/{n}": float(hyper[l, 0]) for l, n in enumerate(names)})
            row.update({f"s1_minus_s2/{n}": float(diff[l]) for l, n in enumerate(names)})
        if parts is not None:
            for part in ("a", "b"):
                for name, grads in zip(self.block_names, getattr(parts, part)):
                    present = [g.abs().flatten() for g in grads if g is not None]
                    row[f"grad_{part}/{name}"] = float(torch.cat(present).mean()) if present else 0.0
        self.records.append(row)
        if phase == "meta":
            self.checkpoints_p1.append((self.meta_done, p[:, 0].tolist()))
            window = self.options.early_stop_window
            old = [p1 for done, p1 in self.checkpoints_p1 if done <= self.meta_done - window]
            if window and old:
                change = max(abs(x - y) for x, y in zip(old[-1], p[:, 0].tolist()))
                self.stopped_early = change < self.options.early_stop_delta

    def drain_records(self) -> dict[str, list[dict[str, Any]]]:
        """Rows logged since the last call, by file name."""
        rows, self.records = self.records, []
        return {"abl_gamma": rows}

    def artifacts(self) -> dict[str, Any]:
        """gamma.json: the current gamma and p, read by stage 2's `gamma_from`."""
        p = self.current_p().cpu()
        return {"gamma": {"gamma": self.gamma.detach().cpu().tolist(), "p1": p[:, 0].tolist(),
                          "blocks": self.block_names[:-1], "meta_steps": self.meta_done,
                          "stopped_early": self.stopped_early, "search": search_record(self.options)}}

    def state_dict(self) -> dict[str, Any]:
        """Adds gamma, the meta optimiser and the search counters."""
        state = super().state_dict()
        state["gamma"] = self.gamma.detach().cpu().clone()
        state["meta_optimizer"] = self.meta_optimizer.state_dict()
        state["meta_done"] = self.meta_done
        state["stopped_early"] = self.stopped_early
        state["checkpoints_p1"] = [[done, list(p1)] for done, p1 in self.checkpoints_p1]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the engine then positions the validation stream after `meta_done` batches."""
        super().load_state_dict(state)
        with torch.no_grad():
            self.gamma.copy_(state["gamma"].to(self.gamma.device))
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.meta_done = int(state["meta_done"])
        self.stopped_early = bool(state["stopped_early"])
        self.checkpoints_p1 = [(int(done), list(p1)) for done, p1 in state["checkpoints_p1"]]


__all__ = ["ABLSearch", "GAMMA_TRAJECTORIES", "configured_warm_steps", "describe_search", "search_record",
           "search_warning", "steps_budget"]
