"""ABL (adaptive block-wise learning for KD): the plain step (`abl`) and its ablations (Tables 5 and 6).

ICLR 2023 submission, OpenReview 8XfHh4XSQ0Q. Each non-last student block l descends p1(l) * alpha * (its local
error, from an auxiliary head on its output with the block input held constant) + p2(l) * beta * (the global teacher
error, ordinary backprop of the KD loss), with p(l) = softmax(gamma(l)); the error passed down to lower blocks is
the pure teacher error. Stage 1 (`abl-search`) learns gamma by bilevel optimisation on a held-out split; stage 2
(`abl`) retrains from scratch with p fixed. Implements the adakd specification specs/abl.md (sections cited as §n).

The block mechanics live in abl_blocks.py, the options in abl_options.py, the search (`abl-search`) in abl_search.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from adakd.distillers.kd import kd_loss
from adakd.models.stage_types import StagedOutput
from adakd.models.staged import StagedModel
from adakd.modes import eval_mode
from adakd.ranks import all_reduce_sum
from adakd.strategies.abl_blocks import (BlockForward, Components, ScaleGrad, average_across_ranks, block_plan,
                                         broadcast_buffers, cross_entropy_upcast, forward_blocks)
from adakd.strategies.abl_heads import build_aux_heads
from adakd.strategies.abl_options import ABLOptions
from adakd.strategies.base import Figure, LossWeights, RunFacts, Strategy
from adakd.strategies.registry import register_strategy


# The epoch mean of p1 per block, logged by every ABL step (train/abl/p1/block<l>).
STUDENT_WEIGHTS = Figure("abl_p1", "ABL student weight per block", "student weight p1 (epoch mean)",
                         columns=r"^train/abl/p1/.*block\d+$", by_block=True)
# [A] Fig. 4c / Fig. 6: the last epoch's test top-1 of each block's head, then of the student's own classifier.
BLOCK_ACCURACY = Figure("block_accuracy", "per-block test accuracy (ABL Fig. 4c / Fig. 6)",
                        "test top-1 of the block's head (%)", columns=r"^test/block_acc/.*block\d+$", kind="blocks",
                        last="test/acc1", compare=True, xlabel="block (last = the student's own classifier)")


class ABLBase(Strategy):
    """The ABL step (§3) with p from `initial_p`; subclasses choose p and may add the bilevel search."""

    option_class: ClassVar[type] = ABLOptions
    uses_heads: ClassVar[bool] = True
    temperature_refusal: ClassVar[str] = (
        "ABL forms each block's KD gradient explicitly (autograd.grad on detached spot leaves, then weighted per "
        "block and assigned to the parameters), so a temperature learned by gradient reversal would need its own "
        "weighting rule across blocks, which neither paper defines")
    figures: ClassVar[tuple[Figure, ...]] = (STUDENT_WEIGHTS, BLOCK_ACCURACY)
    # Student weights and search diagnostics: their own figures (or none), not terms of the loss.
    not_loss_columns: ClassVar[tuple[str, ...]] = ("train/abl/p1/", "train/abl/p2/", "train/abl/hypergrad/",
                                                   "train/abl/grad_norm/")
    # The split would be task = p1 a_l (+ the heads' c), distillation = p2 b_l (+ the distiller's e), but the fused
    # step never forms a_l and b_l apart, and the split is not written for the search's virtual step.
    splits_refusal: ClassVar[str] = (
        "ABL's step forms each block's gradient p1*(local error) + p2*(teacher error) in one fused backward and "
        "passes the teacher error itself down to the lower blocks, so it has no task and distillation gradients "
        "apart to give a second momentum")

    @classmethod
    def options_from_facts(cls, facts: RunFacts) -> dict[str, Any]:
        """The data's input size and channels (the heads are built from measured block shapes) and, when known, the
        run's length in steps (search_scale=auto sizes the search from it)."""
        given = {"input_size": facts.input_shape[-1], "input_channels": facts.input_shape[0]}
        if facts.run_steps is not None:
            given["run_steps"] = facts.run_steps
        return given

    def __init__(self, student: nn.Module, teacher: StagedModel | None, distiller, weights: LossWeights,
                 student_spots: list[int] | None = None, teacher_spots: list[int] | None = None,
                 facts: RunFacts | None = None, **options: Any) -> None:
        super().__init__(student, teacher, distiller, weights, student_spots, teacher_spots, facts, **options)
        if teacher is None or distiller is None:
            raise ValueError(f"{type(self).__name__} needs a teacher and a distiller (task=distill)")
        # Gradients are assembled by hand, so the steps run on the bare model; DDP is replaced by explicit averaging.
        self.student_module: StagedModel = getattr(student, "module", student)
        self.student_preact = bool(getattr(distiller, "student_preact", False))
        self.teacher_preact = bool(getattr(distiller, "teacher_preact", False))
        self.plan = block_plan(self.student_module, self.options.group_by_stage)
        self.num_blocks = len(self.plan)
        if self.num_blocks < 2:
            raise ValueError(f"ABL needs at least 2 blocks; {type(self.student_module.model).__name__} has "
                             f"{self.num_blocks}")
        self.block_names = [f"block{l + 1}" for l in range(self.num_blocks)]
        self.block_params = [self._params_of(units) for units in self.plan]
        owned = {id(p) for params in self.block_params for p in params}
        missing = [n for n, p in self.student_module.named_parameters() if p.requires_grad and id(p) not in owned]
        if missing:
            raise ValueError(f"student parameters outside every ABL block: {missing[:5]}")
        reference = next(self.student_module.parameters())
        # p, gamma and every weight built from them: float32, or the student's dtype when wider. A float32 p in a
        # float64 run rounds p1 * alpha (4e-8 relative in the local gradients), so float64 could not be verified;
        # float16/bfloat16 students keep float32 as before.
        self.meta_dtype = torch.promote_types(reference.dtype, torch.float32)
        self.heads = nn.ModuleList()
        if self.uses_heads:
            shapes = self._block_shapes()
            num_classes = shapes[-1][0]
            self.heads = build_aux_heads(self.options.aux_type, shapes[:-1], num_classes, self.options.aux_width,
                                         self.options.aux_final_dim)
            self.heads.to(reference.device, reference.dtype)
        self.own("heads", self.heads)  # empty without auxiliary heads: the checkpoint entry is there either way
        self.head_params = [list(h.parameters()) for h in self.heads]
        self.distiller_params = [p for p in distiller.trainable_parameters() if p.requires_grad]
        self.p = self.initial_p().to(reference.device, self.meta_dtype)
        self.val_batches: Iterator | None = None

    @staticmethod
    def _params_of(units) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for _, module, _ in units:
            for p in module.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    @torch.no_grad()
    def _block_shapes(self) -> list[tuple[int, ...]]:
        with eval_mode(self.student_module):
            ref = next(self.student_module.parameters())
            size = self.options.input_size
            dummy = torch.zeros(1, self.options.input_channels, size, size, dtype=ref.dtype, device=ref.device)
            out = forward_blocks(self.student_module, self.plan, dummy, False)
            return [tuple(h.shape[1:]) for h in out.block_outputs]

    # ---- p
    def initial_p(self) -> Tensor:
        """p [L - 1, 2] (column 0 = student weight p1) used by the step."""
        raise NotImplementedError

    def p_from_p1(self, p1: list[float] | Tensor) -> Tensor:
        """Stack (p1, 1 - p1) after checking there is one value per non-last block in [0, 1]."""
        # Python numbers are read in meta_dtype directly (0.3 would otherwise be rounded to float32 first).
        p1 = torch.as_tensor(p1, dtype=self.meta_dtype).flatten()
        if p1.numel() != self.num_blocks - 1:
            raise ValueError(f"ABL needs {self.num_blocks - 1} student weights (one per non-last block of "
                             f"{type(self.student_module.model).__name__}), got {p1.numel()}")
        if bool(((p1 < 0) | (p1 > 1)).any()):
            raise ValueError(f"student weights p1 must lie in [0, 1], got {p1.tolist()}")
        return torch.stack([p1, 1 - p1], dim=1)

    def current_p(self) -> Tensor:
        """p of this step."""
        return self.p

    # ---- engine hooks
    def state_dict(self) -> dict[str, Any]:
        """Distiller parts, auxiliary heads and p."""
        state = super().state_dict()
        state["p"] = self.p.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` strictly."""
        super().load_state_dict(state)
        if tuple(state["p"].shape) != tuple(self.p.shape):
            raise ValueError(f"checkpoint p has shape {tuple(state['p'].shape)}, this student needs "
                             f"{tuple(self.p.shape)}")
        self.p = state["p"].to(self.p.device, self.p.dtype)

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """Test accuracy (%) of every auxiliary head: `block_acc/blockK` (Fig. 4c, Fig. 6)."""
        if not (self.options.eval_heads and len(self.heads)):
            return {}
        hits, count = None, None
        with eval_mode(self.student_module, self.heads):
            for images, targets, _ in loader:
                with self.precision.autocast():
                    out = forward_blocks(self.student_module, self.plan, images, False)
                    correct = torch.stack([(head(h).argmax(dim=1) == targets).sum()
                                           for head, h in zip(self.heads, out.block_outputs[:-1])]).double()
                hits = correct if hits is None else hits + correct
                n = torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=correct.device)
                count = n if count is None else count + n
        if hits is None:
            return {}
        totals = torch.cat([hits, count.view(1)])
        all_reduce_sum(totals)
        values = (100 * totals[:-1] / totals[-1]).tolist()
        return {f"block_acc/{name}": v for name, v in zip(self.block_names, values)}

    # ---- the step
    def kd_terms(self, output: StagedOutput, teacher_out: StagedOutput, targets: Tensor, indices: Tensor,
                 epoch: int) -> dict[str, Tensor]:
        """beta * K: the distiller's weighted terms plus the optional weighted KL."""
        return self.kd_terms_on(self.select(output, self.student_spots, self.student_preact), output.features[-1],
                                teacher_out, targets, indices, epoch)

    def kd_terms_on(self, student_feats: list[Tensor], student_logits: Tensor, teacher_out: StagedOutput,
                    targets: Tensor, indices: Tensor, epoch: int) -> dict[str, Tensor]:
        """beta * K from given student spot tensors and logits (the fused step passes detached leaves)."""
        # The bare distiller: its gradients come from autograd.grad, which DDP's reducer never sees (averaged by hand).
        named = self.distiller(student_feats, self.select(teacher_out, self.teacher_spots, self.teacher_preact),
                               targets, indices=indices, epoch=epoch)
        terms = {name: self.weights.method * value for name, value in named.items()}
        if self.weights.kl > 0:
            terms["kl"] = self.weights.kl * kd_loss(student_logits, teacher_out.features[-1],
                                                    self.weights.temperature,
                                                    standardize=self.weights.kl_standardize).mean()
        return terms

    def forward_parts(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      head_scale: Tensor | None = None) -> dict[str, Any]:
        """The §3.2 forward: detached-input blocks, teacher, beta * K on spot leaves, heads' local CEs, final CE.

        `head_scale` multiplies the local error entering h_l (not the head's own gradient), for the fused step.
        """
        with self.precision.autocast():
            forward = forward_blocks(self.student_module, self.plan, images, self.student_preact, detach=True)
            logits = forward.output.features[-1]
            teacher_out = self.teacher(images, preact=self.teacher_preact)
            spots = self.select(forward.output, self.student_spots, self.student_preact) + [logits]
            leaves = [t.detach().requires_grad_() for t in spots]
            kd = self.kd_terms_on(leaves[:-1], leaves[-1], teacher_out, targets, indices, epoch)
            local = []
            for l, (head, h) in enumerate(zip(self.heads, forward.block_outputs[:-1])):
                source = ScaleGrad.apply(h, head_scale[l]) if head_scale is not None else h
                local.append(cross_entropy_upcast(head(source), targets))
            ce = cross_entropy_upcast(logits, targets)
        return {"forward": forward, "teacher_out": teacher_out, "spots": spots, "leaves": leaves, "kd": kd,
                "local": local, "ce": ce, "logits": logits, "owner": self._spot_blocks(forward, spots)}

    def spot_gradients(self, fw: dict[str, Any], scale: float) -> tuple[list, list]:
        """(direct d(beta K)/d(spot) per spot tensor, e for the distiller heads): one call on the leaves."""
        kd_total = torch.stack(list(fw["kd"].values())).sum() if fw["kd"] else None
        if kd_total is None or not kd_total.requires_grad:
            return [None] * len(fw["spots"]), [None] * len(self.distiller_params)
        grads = torch.autograd.grad(kd_total * scale, fw["leaves"] + self.distiller_params, allow_unused=True)
        return list(grads[:len(fw["leaves"])]), list(grads[len(fw["leaves"]):])

    def kd_sweep(self, fw: dict[str, Any], direct: list, with_weights: bool,
                 retain: bool) -> tuple[list, list[Tensor | None]]:
        """Top-down §3.2 sweep: (b_l per block if `with_weights`, total KD gradient at every block output h_l)."""
        forward = fw["forward"]
        by_block: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for t, g, l in zip(fw["spots"], direct, fw["owner"]):
            if g is not None:
                by_block.setdefault(l, []).append((t, g))
        b: list = [[None] * len(params) for params in self.block_params]
        at_h: list[Tensor | None] = [None] * self.num_blocks
        from_above: Tensor | None = None
        for l in reversed(range(self.num_blocks)):
            h = forward.block_outputs[l]
            total = from_above
            outputs, cotangents = [], []
            for t, g in by_block.get(l, []):
                if t is h:  # a spot at the block output joins the gradient arriving from above
                    total = g if total is None else total + g
                else:
                    outputs.append(t)
                    cotangents.append(g)
            at_h[l] = total
            if total is not None:
                outputs.append(h)
                cotangents.append(total)
            from_above = None
            inputs = (list(self.block_params[l]) if with_weights else []) + ([forward.block_inputs[l]] if l else [])
            if not outputs or not inputs:
                continue
            grads = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=retain, allow_unused=True)
            if with_weights:
                b[l] = list(grads[:len(self.block_params[l])])
            if l:
                from_above = grads[-1]
        return b, at_h

    def components(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int) -> Components:
        """a, b, c, e of §1 at the current weights: one forward, one student call, the KD sweep."""
        alpha = self.weights.ce
        scale = self.precision.gradient_scale()
        broadcast_buffers(self.student_module)
        fw = self.forward_parts(images, targets, indices, epoch)
        theta = [p for params in self.block_params for p in params]
        phi = [p for params in self.head_params for p in params]
        direct, e = self.spot_gradients(fw, scale)
        # The leaves stop every local loss at its block's input, so one call gives every block's student part.
        student_loss = torch.stack(fw["local"]).sum() + fw["ce"] if fw["local"] else fw["ce"]
        grads = torch.autograd.grad(student_loss * scale, theta + phi, retain_graph=True, allow_unused=True)
        a_flat = [None if g is None else alpha * g for g in grads[:len(theta)]]
        c_flat = list(grads[len(theta):])
        b, _ = self.kd_sweep(fw, direct, with_weights=True, retain=False)
        b_flat = [g for block in b for g in block]
        if scale != 1.0:  # the parts are kept unscaled: the hypergradient and the virtual step need true values
            b_flat, e, a_flat, c_flat = ([None if g is None else g / scale for g in group]
                                         for group in (b_flat, e, a_flat, c_flat))
        # Everything below is the global (rank-averaged) value, so p, the hypergradient and the step agree on all ranks.
        average_across_ranks([g for g in a_flat + b_flat + c_flat + e if g is not None])
        return Components(a=self._split(a_flat, self.block_params), b=self._split(b_flat, self.block_params),
                          c=self._split(c_flat, self.head_params), e=e, terms=self._terms(fw),
                          logits=fw["logits"].detach(), forward=fw["forward"], teacher_out=fw["teacher_out"],
                          batch=(targets, indices, epoch))

    def _terms(self, fw: dict[str, Any]) -> dict[str, Tensor]:
        terms = {"ce": self.weights.ce * fw["ce"].detach(), **{k: v.detach() for k, v in fw["kd"].items()}}
        terms.update({f"abl/local_ce/{name}": value.detach() for name, value in zip(self.block_names, fw["local"])})
        return terms

    def fused_gradients(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                        p: Tensor) -> tuple[list[tuple[Tensor, Tensor | None]], dict[str, Tensor], Tensor]:
        """The §1 update for a fixed p without forming a_l and b_l apart (same numbers as `combined`).

        The KD sweep requests no weight gradients, only the KD error at every block output; then one backward of
        p1 * alpha * (local CEs) + alpha * CE with the cotangents p2(l) * (KD error at h_l and at the spots inside
        block l) injected gives p1 a_l + p2 b_l for every block at once. This skips the weight-gradient kernels of
        a separate KD backward.
        """
        alpha = self.weights.ce
        last = self.num_blocks - 1
        scale = self.precision.gradient_scale()
        # The head learns from its unweighted CE; h_l receives it scaled by p1(l) * alpha (Eq. 8 against Eq. 7).
        # A tensor, not a list of floats: reading p on the host would wait for the device every step.
        head_scale = (p[:, 0] * alpha).detach() if self.options.aux_grad == "unweighted" else None
        broadcast_buffers(self.student_module)
        fw = self.forward_parts(images, targets, indices, epoch, head_scale)
        forward = fw["forward"]
        theta = [q for params in self.block_params for q in params]
        phi = [q for params in self.head_params for q in params]
        direct, e = self.spot_gradients(fw, scale)
        _, at_h = self.kd_sweep(fw, direct, with_weights=False, retain=True)
        student_loss = alpha * fw["ce"]
        for l, value in enumerate(fw["local"]):
            student_loss = student_loss + (value if head_scale is not None else p[l, 0] * alpha * value)
        outputs, cotangents = [student_loss * scale], [torch.ones_like(student_loss)]
        weight = [p[l, 1] for l in range(last)] + [1.0]
        for l, g in enumerate(at_h):
            if g is not None:
                outputs.append(forward.block_outputs[l])
                cotangents.append(weight[l] * g)
        boundary = {id(h) for h in forward.block_outputs}
        for t, g, l in zip(fw["spots"], direct, fw["owner"]):
            if g is not None and id(t) not in boundary:  # a spot at a block output is already inside at_h
                outputs.append(t)
                cotangents.append(weight[l] * g)
        grads = torch.autograd.grad(outputs, theta + phi, cotangents, allow_unused=True)
        pairs = list(zip(theta + phi, grads)) + list(zip(self.distiller_params, e))
        if scale != 1.0:
            pairs = [(q, None if g is None else g / scale) for q, g in pairs]
        average_across_ranks([g for _, g in pairs if g is not None])
        return pairs, self._terms(fw), fw["logits"].detach()

    def _spot_blocks(self, forward: BlockForward, spots: list[Tensor]) -> list[int]:
        """The block whose forward produced each spot tensor."""
        made_by: dict[int, int] = {}
        stage_block = {stage: l for l, units in enumerate(self.plan) for stage, _, ends in units if ends}
        for stage_index in range(len(self.student_module.stages)):
            for tensor in (forward.output.features[stage_index], forward.output.preacts[stage_index]):
                if tensor is not None:
                    made_by.setdefault(id(tensor), stage_block[stage_index])
        return [made_by[id(t)] for t in spots]

    @staticmethod
    def _split(flat: list, groups: list[list]) -> list[list]:
        """Cut a flat per-parameter list into the shape of `groups`."""
        out, offset = [], 0
        for params in groups:
            out.append(flat[offset:offset + len(params)])
            offset += len(params)
        return out

    def combined(self, parts: Components, p: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """(parameter, gradient) pairs of §1: p1 a + p2 b in non-last blocks, a + b in the last, c and e as they are."""
        pairs = []
        last = self.num_blocks - 1
        for l, params in enumerate(self.block_params):
            w1, w2 = (p[l, 0], p[l, 1]) if l < last else (1.0, 1.0)
            for param, a, b in zip(params, parts.a[l], parts.b[l]):
                if a is None and b is None:
                    grad = None
                elif b is None:
                    grad = w1 * a
                elif a is None:
                    grad = w2 * b
                else:
                    grad = w1 * a + w2 * b
                pairs.append((param, grad))
        for l, params in enumerate(self.head_params):
            scale = p[l, 0] * self.weights.ce if self.options.aux_grad == "weighted" else 1.0
            pairs.extend((param, None if c is None else scale * c) for param, c in zip(params, parts.c[l]))
        pairs.extend(zip(self.distiller_params, parts.e))
        return pairs

    def apply(self, pairs: list[tuple[Tensor, Tensor | None]]) -> None:
        """Assign the gradients and step the student's SGD (through the loss scaler under float16 AMP)."""
        # Assigned grads are multiplied by the loss scale: the scaler's step unscales them and skips on inf/NaN.
        self.optimizer_step(self.optimizers["main"], grads=pairs)

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """The fused §1 update with this step's p, one SGD step."""
        p = self.current_p()
        pairs, terms, logits = self.fused_gradients(images, targets, indices, epoch, p)
        self.apply(pairs)
        return self.step_output(terms, logits, p, targets)

    def step_output(self, terms: dict[str, Tensor], logits: Tensor, p: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Loss terms, p1 per block, loss = alpha CE + beta K (Eq. 1), and the correct count."""
        out = dict(terms)
        kd = [v for k, v in terms.items() if k != "ce" and not k.startswith("abl/")]
        out["loss"] = terms["ce"] + (torch.stack(kd).sum() if kd else 0.0)
        p1 = p[:, 0].detach().float()
        out.update({f"abl/p1/{name}": p1[l] for l, name in enumerate(self.block_names[:-1])})
        out["correct"] = (logits.argmax(dim=1) == targets).sum()
        return out


@register_strategy("abl")
class ABL(ABLBase):
    """Stage 2 (§7): p fixed at softmax(gamma*) from a search run (`gamma_from`), or given as `gamma` or `p1`."""

    # The stage that finds gamma* when none is given: pipelines (`adakd abl`, sweeps) run it first.
    search_strategy: ClassVar[str] = "abl-search"
    search_options: ClassVar[tuple[str, ...]] = ("gamma_from", "gamma", "p1")
    searched: ClassVar[str] = "gamma"

    @classmethod
    def search_overrides(cls) -> dict[str, Any]:
        """§12 row 12: stage 1 runs at the constant base lr (its length comes from the steps)."""
        return {"optim": {"milestones": []}}

    @classmethod
    def handoff(cls, search_dir: Path) -> dict[str, Any]:
        """The final runs read gamma* from the search run's gamma.json."""
        return {"gamma_from": str(search_dir)}

    @classmethod
    def describe_search(cls, search_dir: Path) -> str:
        """The gamma updates made (of how many, at what meta_lr and scale, whether p1 settled) and the searched p1."""
        gamma = json.loads((Path(search_dir) / "gamma.json").read_text())
        p1 = " ".join(f"{v:.3f}" for v in gamma["p1"])
        ran = gamma.get("search") or {}  # older gamma.json files have no record of the search's size
        done = f"{gamma['meta_steps']}" + (f" of up to {ran['meta_steps']}" if "meta_steps" in ran else "")
        size = (f" at meta_lr {ran['meta_lr']:.3g}, search_scale {ran['search_scale']} (S = {ran['scale']:.3g})"
                if {"meta_lr", "search_scale", "scale"} <= set(ran) else "")
        settled = ", stopped early: p1 settled" if gamma.get("stopped_early") else ""
        return f"search: {search_dir} ({done} gamma updates{size}{settled}); student weight p1 per block: {p1}"

    def initial_p(self) -> Tensor:
        opts = self.options
        given = [name for name in ("gamma_from", "gamma", "p1") if getattr(opts, name) is not None]
        if len(given) != 1:
            raise ValueError("abl needs exactly one of gamma_from (a finished abl-search run folder or its "
                             "gamma.json), gamma or p1; run stage 1 first with `adakd abl` (both stages) or "
                             f"strategy=abl-search, got {given or 'none'}")
        if opts.p1 is not None:
            return self.p_from_p1(list(opts.p1))
        gamma = torch.tensor(opts.gamma if opts.gamma is not None else read_gamma(opts.gamma_from),
                             dtype=self.meta_dtype)
        if tuple(gamma.shape) != (self.num_blocks - 1, 2):
            raise ValueError(f"gamma must have shape ({self.num_blocks - 1}, 2) for this student "
                             f"({self.num_blocks} blocks), got {tuple(gamma.shape)}")
        return gamma.softmax(dim=1)


def read_gamma(path: str | Path) -> list[list[float]]:
    """gamma [L - 1, 2] from a search run folder or its gamma.json."""
    path = Path(path)
    file = path / "gamma.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"gamma_from: {str(file)!r} does not exist; give the folder of an abl-search run (it "
                         "writes gamma.json after every epoch)")
    try:
        return json.loads(file.read_text())["gamma"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"gamma_from: {str(file)!r} is not a gamma.json written by abl-search ({err})") from None


@register_strategy("abl-fixed")
class ABLFixed(ABLBase):
    """Fixed ablation (Table 6) = Local of Table 5: p = (0.5, 0.5) in every non-last block (gamma = 0)."""

    def initial_p(self) -> Tensor:
        return torch.full((self.num_blocks - 1, 2), 0.5, dtype=self.meta_dtype)


@register_strategy("abl-no")
class ABLNo(ABLBase):
    """No ablation (Table 6): p = (1, 0), so the teacher error reaches only the last block."""

    def initial_p(self) -> Tensor:
        return self.p_from_p1([1.0] * (self.num_blocks - 1))


@register_strategy("abl-random")
class ABLRandom(ABLBase):
    """Random ablation (Table 6): p1 ~ U(0, 1) per block, drawn once from the run's seed (or every step)."""

    def initial_p(self) -> Tensor:
        # Drawn in float32 whatever the student's dtype: the same p1 (and RNG stream) in every precision.
        return self.p_from_p1(torch.rand(self.num_blocks - 1))

    def current_p(self) -> Tensor:
        if self.options.random_resample:
            self.p = self.p_from_p1(torch.rand(self.num_blocks - 1)).to(self.p.device)
        return self.p


@register_strategy("abl-global")
class ABLGlobal(ABLBase):
    """Global ablation (Table 5): standard KD backprop, student CE from the final layer, non-last blocks x 0.5."""

    uses_heads = False

    def initial_p(self) -> Tensor:
        return torch.full((self.num_blocks - 1, 2), 0.5, dtype=self.meta_dtype)

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """One ordinary backward of alpha CE + beta K, then the non-last blocks' gradients halved."""
        broadcast_buffers(self.student_module)
        with self.precision.autocast():
            output = self.student_module(images, preact=self.student_preact)
            teacher_out = self.teacher(images, preact=self.teacher_preact)
            kd = self.kd_terms(output, teacher_out, targets, indices, epoch)
            ce = self.weights.ce * cross_entropy_upcast(output.features[-1], targets)
        loss = ce + (torch.stack(list(kd.values())).sum() if kd else 0.0)
        params = [p for params in self.block_params for p in params] + self.distiller_params

        @torch.no_grad()
        def weight_non_last_blocks() -> None:
            for l, block in enumerate(self.block_params[:-1]):
                for param in block:
                    if param.grad is not None:
                        param.grad.mul_(self.p[l, 1])

        self.optimizer_step(self.optimizers["main"], loss, unsynced=params, adjust=weight_non_last_blocks)
        out = {"ce": ce.detach(), **{k: v.detach() for k, v in kd.items()}}
        out["loss"] = loss.detach()
        out["correct"] = (output.features[-1].detach().argmax(dim=1) == targets).sum()
        return out


__all__ = ["ABL", "ABLBase", "ABLFixed", "ABLGlobal", "ABLNo", "ABLRandom", "read_gamma"]
