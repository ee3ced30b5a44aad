"""An automatic stage layout for models without a hand-written one (timm, torchvision, your own).

The model's `forward` is traced with torch.fx, its residual blocks kept as leaf calls, and the graph is cut into
runnable segments: the stem (everything before the first block), one segment per block (glue such as a stage's
downsampling joins the block after it), the pool (everything from the last block to the classifier: global or
token pooling, final norms, a timm `conv_head`) and the head (the classifier, with a dropout right before it).
A cut is valid only where exactly one tensor crosses it. Segments hold the model's own modules and Parameter
objects (buffers are fetched from the model at each call), so nothing is copied and `model.state_dict()` is
unchanged.

Blocks and stages come from the model's structure, never from typed-in shapes:
- timm: `feature_info` names one module per reduction stage; its blocks are the module's `blocks`, its
  children if it is a Sequential or its children are numbered (RegNet's `b1`), or the module itself (a ViT
  `blocks.3`). Leading entries without blocks (`act1`, `bn1`) are stem pieces. An isotropic model (all entries at
  one reduction: ViT, Mixer) has its blocks split into `ISOTROPIC_STAGES` equal stages.
- otherwise: `layer1..layerN` children (ResNet-like) are the stages, their children the blocks; or the elements
  of a `features` Sequential (MobileNet, EfficientNet; a plain nn.Sequential element contributes its children)
  are the blocks after the stem `features[0]`, grouped into stages where the measured resolution drops.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable

import torch
from torch import Tensor, fx, nn

from adakd.models.stage_types import Stage
from adakd.modes import eval_mode

# ViT-Tiny has 12 blocks at one resolution; 4 stages of 3 mirror ResNet's 4 stages for the feature distillers.
ISOTROPIC_STAGES = 4
# Resolution used to measure where a torchvision `features` list downsamples: 128 / 32 leaves 4x4 at the end.
PROBE_SIDE = 128


class AutoLayoutError(TypeError):
    """The model cannot be cut into stages automatically; the message says why and what to do instead."""


def _hint(model: nn.Module) -> str:
    return (f"; give {type(model).__name__} a hand-written layout with "
            f"@adakd.models.register_layout({type(model).__name__}) (see adakd/models/imagenet/resnet.py)")


# ---------------------------------------------------------------------------------------------- discovery


def _is_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList))


def _blocks_of(name: str, module: nn.Module) -> list[str] | None:
    """Block names inside the stage module `name`, or None if it holds no blocks (a stem piece such as `act1`)."""
    children = [child for child, _ in module.named_children()]
    if isinstance(getattr(module, "blocks", None), (nn.Sequential, nn.ModuleList)):
        return [f"{name}.blocks.{k}" for k in range(len(module.blocks))]
    if _is_list(module):
        return [f"{name}.{child}" for child in children]
    if children and all(re.fullmatch(r"[a-z_]*\d+", child) for child in children):
        return [f"{name}.{child}" for child in children]
    if name.rpartition(".")[2].isdigit():  # an element of a block list, e.g. ViT's blocks.3
        return [name]
    return None


def _containers(model: nn.Module, previous: str | None, name: str) -> list[str]:
    """Stage modules from after `previous` to `name`: timm's feature_info skips blocks.3 of EfficientNet."""
    parent, _, index = name.rpartition(".")
    if not index.isdigit() or not _is_list(model.get_submodule(parent)):
        return [name]
    first = 0
    if previous is not None and previous.rpartition(".")[0] == parent:
        first = int(previous.rpartition(".")[2]) + 1
    return [f"{parent}.{k}" for k in range(first, int(index) + 1)]


def timm_stage_blocks(model: nn.Module) -> list[list[str]]:
    """Block names per stage of a timm model, from its `feature_info` (one entry kept per reduction)."""
    entries: list[tuple[str, int]] = []
    for info in model.feature_info:
        name, reduction = info["module"], info["reduction"]
        if _blocks_of(name, model.get_submodule(name)) is None:
            if entries:
                raise AutoLayoutError(f"feature_info entry {name!r} comes after a stage but holds no blocks"
                                      + _hint(model))
            continue  # a stem piece
        if entries and entries[-1][1] == reduction:
            entries[-1] = (name, reduction)  # the stage ends at the last module of its reduction
        else:
            entries.append((name, reduction))
    if not entries:
        raise AutoLayoutError("its feature_info names no module holding blocks" + _hint(model))
    stages, previous = [], None
    for name, _ in entries:
        blocks = []
        for container in _containers(model, previous, name):
            blocks.extend(_blocks_of(container, model.get_submodule(container)) or [container])
        stages.append(blocks)
        previous = name
    if len(stages) == 1 and len(stages[0]) >= ISOTROPIC_STAGES:
        stages = [list(part) for part in _split_evenly(stages[0], ISOTROPIC_STAGES)]
    return stages


def _split_evenly(items: list[str], parts: int) -> list[list[str]]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        out.append(items[start:end])
        start = end
    return out


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


@torch.no_grad()
def _group_by_resolution(model: nn.Module, blocks: list[str]) -> list[list[str]]:
    """Consecutive blocks with the same measured output resolution form one stage."""
    conv = _first_conv(model)
    if conv is None:
        raise AutoLayoutError("no Conv2d to infer its input channels from" + _hint(model))
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[2:])))
        for name in blocks]
    try:
        with eval_mode(model):  # BatchNorm must not update its running statistics on the probe
            model(torch.zeros(1, conv.in_channels, PROBE_SIDE, PROBE_SIDE,
                              dtype=conv.weight.dtype, device=conv.weight.device))
    finally:
        for hook in hooks:
            hook.remove()
    stages: list[list[str]] = []
    for name in blocks:
        if stages and sizes.get(name) == sizes.get(stages[-1][-1]):
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


def generic_stage_blocks(model: nn.Module) -> list[list[str]]:
    """Block names per stage of a torchvision-style model: `layer1..N` children or a `features` Sequential."""
    children = dict(model.named_children())
    layers = [name for name in children if re.fullmatch(r"layer\d+", name)]
    if layers:
        return [[f"{layer}.{child}" for child, _ in children[layer].named_children()] for layer in layers]
    features = children.get("features")
    if isinstance(features, nn.Sequential) and len(features) > 1:
        blocks = []
        for index, element in list(features.named_children())[1:]:  # features[0] is the stem
            if type(element) is nn.Sequential:  # a stage of blocks (EfficientNet), not a Conv-BN-act subclass
                blocks.extend(f"features.{index}.{child}" for child, _ in element.named_children())
            else:
                blocks.append(f"features.{index}")
        return _group_by_resolution(model, blocks)
    raise AutoLayoutError("it has no timm feature_info, no layer1..N children and no `features` Sequential, so "
                          "its stages are unknown; pass stage_blocks=[[block names of stage 1], ...]" + _hint(model))


# ------------------------------------------------------------------------------------------------ tracing


def _timm_notrace() -> tuple[set[type], tuple[Callable, ...]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return set(), ()
    return set(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


class _BlockTracer(fx.Tracer):
    """Traces through containers but keeps the blocks (and timm's untraceable layers) as single calls."""

    def __init__(self, leaves: set[int]) -> None:
        self.notrace_modules, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (id(m) in self.leaves or type(m) in self.notrace_modules
                or super().is_leaf_module(m, module_qualified_name))


def _trace(model: nn.Module, blocks: list[str], training: bool) -> fx.Graph:
    """The graph of `model.forward` in train or eval mode (code reading `self.training` is baked in)."""
    leaves = {id(model.get_submodule(name)) for name in blocks}
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Module):
        leaves.add(id(classifier))  # timm's Linear subclass would otherwise be traced into F.linear
    # Optional forward arguments (timm ViT's attn_mask) are fixed to their defaults.
    params = list(inspect.signature(type(model).forward).parameters.values())[2:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    # eval_mode gives every submodule its own flag back afterwards; inside it, the model takes the traced mode.
    with eval_mode(model):
        model.train(training)
        try:
            graph = _BlockTracer(leaves).trace(model, concrete_args=concrete or None)
        except AutoLayoutError:
            raise
        except Exception as err:  # noqa: BLE001 - TraceError, control flow on a Proxy, unsupported ops: one message
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AutoLayoutError(f"torch.fx cannot trace its forward outside the blocks ({type(err).__name__}: "
                                  f"{first})" + _hint(model)) from None
    _drop_guards(graph)
    return graph


def _drop_guards(graph: fx.Graph) -> None:
    """Remove the placeholders of fixed arguments with the guard nodes FX adds for them, leaving one input."""
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        doomed, frontier = [], [placeholder]
        while frontier:  # the guards (`_assert_is_none`, `eq` -> `_assert`) and nothing else use it
            node = frontier.pop()
            doomed.append(node)
            frontier.extend(node.users)
        for node in sorted(set(doomed), key=list(graph.nodes).index, reverse=True):
            graph.erase_node(node)


# ---------------------------------------------------------------------------------------------- splitting


def _is_dropout(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), nn.modules.dropout._DropoutNd)
    return node.op == "call_function" and node.target in (torch.nn.functional.dropout, torch.dropout)


def _classifier_node(model: nn.Module, nodes: list[fx.Node]) -> fx.Node:
    """The call of the classifier: timm's `get_classifier()`, else the last Linear."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    calls = [n for n in nodes if n.op == "call_module"]
    if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
        found = [n for n in calls if model.get_submodule(n.target) is classifier]
    else:
        found = [n for n in calls if isinstance(model.get_submodule(n.target), nn.Linear)][-1:]
    if len(found) != 1:
        raise AutoLayoutError("no single classifier call (nn.Linear or timm's get_classifier()) was found; build "
                              "it with num_classes > 0" + _hint(model))
    return found[0]


def _cuts(model: nn.Module, graph: fx.Graph, blocks: list[str]) -> tuple[list[fx.Node], list[int], list[str]]:
    """Graph nodes, the cut positions (a segment ends at each) and a label per segment."""
    nodes = list(graph.nodes)
    where: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        if node.op == "call_module":
            where.setdefault(node.target, []).append(index)
    positions = []
    for name in blocks:
        if len(where.get(name, [])) != 1:
            raise AutoLayoutError(f"block {name!r} is called {len(where.get(name, []))} times in its forward "
                                  "(expected once)" + _hint(model))
        positions.append(where[name][0])
    if positions != sorted(positions):
        raise AutoLayoutError("its forward does not run the blocks in module order" + _hint(model))
    head = nodes.index(_classifier_node(model, nodes))
    if head <= positions[-1]:
        raise AutoLayoutError("the classifier runs before the last block" + _hint(model))
    pool_end = head - 1
    while pool_end > positions[-1] and _is_dropout(nodes[pool_end], model):
        pool_end -= 1  # a dropout right before the classifier is part of the head (timm's pre_logits)
    cuts = [positions[0] - 1, *positions, pool_end, len(nodes) - 2]  # the last node is the output
    labels = ["stem", *(f"block {name!r}" for name in blocks), "pool", "head"]
    return nodes, cuts, labels


def _fetch(root: nn.Module, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, attr)


class GraphSegment(nn.Module):
    """A run of the model's traced forward between two cuts; it reuses the model's modules and parameters.

    It holds one graph per mode because traced code reading `self.training` (timm's `F.dropout(...,
    training=self.training)`) is frozen at trace time; the model's own `training` flag picks the graph, so
    `view.train()` / `model.eval()` work as usual.
    """

    def __init__(self, root: nn.Module, graphs: dict[bool, tuple[fx.GraphModule, list[str]]], label: str) -> None:
        super().__init__()
        self.train_graph, self.train_attrs = graphs[True]
        self.eval_graph, self.eval_attrs = graphs[False]
        self._root = (root,)  # a tuple, so the whole model is not registered as a submodule of this segment
        self.label = label

    def forward(self, x: Tensor) -> Tensor:
        root = self._root[0]
        graph, attrs = ((self.train_graph, self.train_attrs) if root.training
                        else (self.eval_graph, self.eval_attrs))
        return graph(x, *(_fetch(root, target) for target in attrs))

    def extra_repr(self) -> str:
        return self.label


def _segment(model: nn.Module, nodes: list[fx.Node], start: int, end: int, inp: fx.Node, out: fx.Node,
             name: str) -> tuple[fx.GraphModule, list[str]]:
    """A GraphModule running nodes[start..end] on the value `inp`.

    Parameters read with get_attr (ViT's `cls_token`, a traced-through LayerNorm's weight) stay get_attr nodes:
    GraphModule then holds the model's own Parameter objects, so `segment.parameters()` lists them for ABL. Buffers
    are passed in, fetched from the model at each call, because `model.to()` replaces buffer tensors.
    """
    graph = fx.Graph()
    env = {inp: graph.placeholder("x")}
    attrs: list[str] = []
    for node in nodes[start:end + 1]:
        for used in node.all_input_nodes:
            if used.op == "get_attr" and used not in env:
                if isinstance(_fetch(model, used.target), nn.Parameter):
                    env[used] = graph.get_attr(used.target)
                else:
                    env[used] = graph.placeholder(f"attr{len(attrs)}")
                    attrs.append(used.target)
    for node in nodes[start:end + 1]:
        if node.op == "get_attr":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[out])
    return fx.GraphModule(model, graph, class_name=re.sub(r"\W", "_", name)), attrs


def _split(model: nn.Module, graph: fx.Graph, blocks: list[str]) -> list[tuple[fx.GraphModule, list[str]]]:
    nodes, cuts, labels = _cuts(model, graph, blocks)
    position = {node: k for k, node in enumerate(nodes)}
    inputs = [n for n in nodes if n.op == "placeholder"]
    outputs = nodes[-1].args[0]
    if not isinstance(outputs, fx.Node):
        raise AutoLayoutError("its forward does not return a single tensor" + _hint(model))
    values = [inputs[0]]
    for cut, label in zip(cuts[:-1], labels):
        crossing = [n for n in nodes[:cut + 1] if n.op != "get_attr"
                    and any(position[user] > cut for user in n.users)]
        if len(crossing) != 1:
            raise AutoLayoutError(
                f"it cannot be cut after its {label}: {len(crossing)} values cross that point "
                f"({', '.join(n.name for n in crossing) or 'none'}), so its forward mixes tensors across the "
                "boundary" + _hint(model))
        values.append(crossing[0])
    values.append(outputs)
    starts = [position[inputs[0]] + 1, *(cut + 1 for cut in cuts[:-1])]
    return [_segment(model, nodes, start, end, values[k], values[k + 1], labels[k])
            for k, (start, end) in enumerate(zip(starts, cuts))]


def auto_stages(model: nn.Module, stage_blocks: list[list[str]] | None = None) -> list[Stage]:
    """The stages `[stem, stage1..N, pool, head]` of `model`, cut from its traced forward (see the module doc)."""
    if stage_blocks is None:
        stage_blocks = timm_stage_blocks(model) if hasattr(model, "feature_info") else generic_stage_blocks(model)
    blocks = [name for stage in stage_blocks for name in stage]
    if not blocks:
        raise AutoLayoutError("it has no blocks" + _hint(model))
    by_mode = {mode: _split(model, _trace(model, blocks, mode), blocks) for mode in (True, False)}
    if len(by_mode[True]) != len(by_mode[False]):
        raise AutoLayoutError("its train and eval forwards differ in structure" + _hint(model))
    labels = ["stem", *blocks, "pool", "head"]
    segments = [GraphSegment(model, {True: train, False: evaluation}, label)
                for train, evaluation, label in zip(by_mode[True], by_mode[False], labels)]
    stages = [Stage("stem", [segments[0]], merge_into_next_block=True)]
    offset = 1
    for index, stage in enumerate(stage_blocks, 1):
        stages.append(Stage(f"stage{index}", segments[offset:offset + len(stage)]))
        offset += len(stage)
    stages += [Stage("pool", [segments[-2]]), Stage("head", [segments[-1]])]
    return stages
