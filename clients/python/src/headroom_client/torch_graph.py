"""Any ``nn.Module`` as a job's layer list, read from its ``torch.fx`` graph.

The model is traced (subclasses, ``forward`` methods and functional calls included), and every
node's shape is found by running the graph on a fake batch (no memory, no weights read). The
graph must then be a chain of steps and residual blocks: a value that two branches read and an
addition that joins them (``out += identity``, ``x + self.conv(x)``) becomes a ``residual``
layer, its body the branch that runs first and its shortcut the other. The blocks come from the
graph, never from class names. Modules whose parameters are all frozen (``requires_grad`` false)
become ``frozen`` layers, a run of them one ``frozen`` list."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.operator_schemas import normalize_function

from headroom_client import torch_layers
from headroom_client.client import Json
from headroom_client.torch_layers import Unsupported

#: The additions that join a residual block's branches, and whether each writes in place.
ADDITIONS: dict[Any, bool] = {operator.add: False, torch.add: False, operator.iadd: True}
ADD_METHODS = {"add": False, "add_": True}


class UnsupportedModel(ValueError):
    """The model cannot be read; ``path`` names the module (or ``model``) at fault."""

    def __init__(self, path: str, module: nn.Module | None, why: str) -> None:
        where = f"{path} ({type(module).__name__})" if module is not None else path
        super().__init__(f"{where}: {why}")
        self.path = path


class _Proxy(fx.Proxy):
    """fx's proxy, which records ``+=`` as ``operator.iadd`` rather than as a new sum."""

    def __iadd__(self, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class _Tracer(fx.Tracer):
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Hugging Face's RMS norm is read whole, as headroom's composite norm.
        return torch_layers.hugging_face_rms_norm(m) or super().is_leaf_module(m, module_qualified_name)


def _shapes(
    traced: fx.GraphModule, module: nn.Module, shape: list[int], tokens: bool
) -> dict[fx.Node, list[int]]:
    """Every tensor node's sample shape, from a run over a fake batch of two (token ids when
    ``tokens``; errors name the node)."""
    found: dict[fx.Node, list[int]] = {}

    class Run(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            try:
                value = super().run_node(node)
            except Exception as error:  # PyTorch's own message, with the step it came from
                raise _refusal(traced, node, f"PyTorch cannot run it on {shape}: {error}") from None
            if isinstance(value, torch.Tensor) and node.op != "output":
                found[node] = list(value.shape[1:])
            return value

    dtype = torch.long if tokens else torch.float32
    on_meta = any(p.is_meta for p in module.parameters())
    if on_meta:
        Run(traced).run(torch.zeros(2, *shape, device="meta", dtype=dtype))
    else:
        with FakeTensorMode(allow_non_fake_inputs=True) as fake:
            Run(traced).run(fake.from_tensor(torch.zeros(2, *shape, dtype=dtype)))
    return found


def _path(node: fx.Node) -> str:
    """Where a node comes from in the model: its module's path, or the call after the module
    whose ``forward`` made it."""
    if node.op == "call_module":
        return f"model.{node.target}"
    stack = node.meta.get("nn_module_stack")
    owner = next(reversed(stack.values()))[0] if stack else ""
    name = getattr(node.target, "__name__", str(node.target))
    return f"model{'.' + owner if owner else ''} ({name})"


def _refusal(traced: fx.GraphModule, node: fx.Node, why: str) -> UnsupportedModel:
    if node.op == "call_module":
        return UnsupportedModel(_path(node), traced.get_submodule(str(node.target)), why)
    return UnsupportedModel(_path(node), None, why)


class _Reader:
    """The traced graph read back into nested layer lists."""

    def __init__(self, traced: fx.GraphModule, shapes: dict[fx.Node, list[int]]) -> None:
        self.traced = traced
        self.shapes = shapes
        self.order = {node: i for i, node in enumerate(traced.graph.nodes)}
        self.read: set[fx.Node] = set()
        self.dominators = self._dominators()

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if n in self.shapes]

    def _dominators(self) -> dict[fx.Node, set[fx.Node]]:
        """For each tensor node, the nodes every path from the input to it passes."""
        dominators: dict[fx.Node, set[fx.Node]] = {}
        for node in self.traced.graph.nodes:
            if node not in self.shapes:
                continue
            inputs = [dominators[n] for n in self.tensor_inputs(node)]
            dominators[node] = {node} | (set.intersection(*inputs) if inputs else set())
        return dominators

    def fork(self, node: fx.Node) -> fx.Node:
        """The last value both branches of an addition come from."""
        shared = self.dominators[node] - {node}
        if not shared:
            raise _refusal(self.traced, node, "adds a tensor that does not come from the input")
        return max(shared, key=self.order.__getitem__)

    def chain(self, start: fx.Node, end: fx.Node) -> list[Json]:
        """The layers that take ``start``'s value to ``end``'s."""
        layers: list[Json] = []
        node = end
        while node is not start:
            if node in self.read or self.order[node] < self.order[start] or node.op == "placeholder":
                raise _refusal(
                    self.traced, node,
                    "its value is read outside the block it is in: headroom reads chains of "
                    "layers and residual blocks (one branch added to another)",
                )
            self.read.add(node)
            joined = self.addition(node)
            if joined is not None:
                layers.insert(0, self.residual(node, *joined))
                node = self.fork(node)
            else:
                layers.insert(0, self.layer(node))
                (node,) = self.tensor_inputs(node)
        return layers

    def addition(self, node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
        """The two summands of a residual addition, and whether it writes in place."""
        if node.op == "call_function" and node.target in ADDITIONS:
            in_place = ADDITIONS[node.target]
        elif node.op == "call_method" and node.target in ADD_METHODS:
            in_place = ADD_METHODS[str(node.target)]
        else:
            return None
        summands = node.args
        if len(summands) != 2 or node.kwargs or not all(n in self.shapes for n in summands):
            raise _refusal(self.traced, node, "headroom adds two branches' tensors, unscaled")
        left, right = summands
        assert isinstance(left, fx.Node) and isinstance(right, fx.Node)
        return left, right, in_place

    def residual(self, node: fx.Node, left: fx.Node, right: fx.Node, in_place: bool) -> Json:
        fork = self.fork(node)
        if self.shapes[left] != self.shapes[right]:
            raise _refusal(self.traced, node, f"adds {self.shapes[left]} to {self.shapes[right]}")
        first, second = sorted((left, right), key=self._first_step(fork))
        if in_place and first is not left:
            raise _refusal(
                self.traced, node,
                "adds in place into the branch that runs second (or the block's input): "
                "headroom adds into the body's output (out += identity)",
            )
        block: Json = {"layers": self.chain(fork, first)}
        shortcut = self.chain(fork, second)
        if shortcut:
            block["shortcut"] = shortcut
        if in_place:
            block["inplace"] = True
        return {"residual": block}

    def _first_step(self, fork: fx.Node) -> Any:
        """The graph position of a branch's first step (an empty branch sorts last)."""
        def position(end: fx.Node) -> int:
            if end is fork:
                return len(self.order)
            steps = [n for n in self.dominators[end] if self.order[n] > self.order[fork]]
            return min((self.order[n] for n in steps), default=len(self.order))

        return position

    def layer(self, node: fx.Node) -> Json:
        """One step that reads one tensor."""
        inputs = self.tensor_inputs(node)
        if len(inputs) != 1:
            raise _refusal(
                self.traced, node,
                f"combines {len(inputs)} tensors; headroom's layers read one, and branches join "
                "only by addition (a residual block)",
            )
        shape = self.shapes[inputs[0]]
        try:
            return self._entry(node, shape)
        except Unsupported as error:
            raise _refusal(self.traced, node, str(error)) from None

    def _entry(self, node: fx.Node, shape: list[int]) -> Json:
        if node.op == "call_module":
            module = self.traced.get_submodule(str(node.target))
            layer = torch_layers.of_module(module, shape)
            if isinstance(module, nn.Linear) and module.weight is _first_table(self.traced):
                layer["linear"]["tied"] = True
            return _frozen_if_frozen(module, layer)
        if node.op == "call_function" and node.target in torch_layers.FUNCTIONS:
            assert callable(node.target)
            normalized = normalize_function(
                node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True
            )
            if normalized is None:
                raise Unsupported("its arguments could not be read")
            return torch_layers.FUNCTIONS[node.target](normalized.kwargs, shape)
        if node.op == "call_method" and node.target in torch_layers.METHODS:
            read, names = torch_layers.METHODS[str(node.target)]
            args = dict(zip(names, node.args[1:]), **node.kwargs)
            return read(args, shape)
        if node.op == "call_method" and node.target in ("view", "reshape"):
            sizes = [None if isinstance(a, fx.Node) else a for a in node.args[1:]]
            return torch_layers.of_reshape(sizes, shape)
        raise Unsupported(f"headroom cannot describe this step; it reads {torch_layers.SUPPORTED}")

    def unread(self) -> Iterator[fx.Node]:
        """Tensor steps the chain did not reach (their results unused)."""
        for node in self.shapes:
            if node not in self.read and node.op != "placeholder":
                yield node


def _frozen_if_frozen(module: nn.Module, layer: Json) -> Json:
    """``layer`` as a ``frozen`` one when every parameter of ``module`` is frozen."""
    trains = {p.requires_grad for p in module.parameters()}
    if trains == {True, False}:
        raise Unsupported(
            "freezes some of its parameters and trains others; headroom freezes whole layers "
            "(requires_grad_(False) on the module)"
        )
    return {"frozen": {"layers": [layer]}} if trains == {False} else layer


def _is_frozen(layer: Json) -> bool:
    return next(iter(layer)) == "frozen"


def _frozen_layers(layers: list[Json]) -> list[Json]:
    """The layers inside ``frozen`` lists, unwrapped."""
    return [inner for layer in layers for inner in (layer["frozen"]["layers"] if _is_frozen(layer) else [layer])]


def merge_frozen(layers: list[Json]) -> list[Json]:
    """``layers`` with frozen runs joined: a residual block whose every layer is frozen or
    holds no parameters (and one at least frozen) frozen as a whole, and frozen layers with
    only parameter-free layers between them one ``frozen`` list."""
    blocks: list[Json] = []
    for layer in layers:
        if next(iter(layer)) == "residual":
            block = dict(layer["residual"])
            branches = [merge_frozen(block[k]) for k in ("layers", "shortcut") if k in block]
            inner = [item for branch in branches for item in branch]
            for key, branch in zip(("layers", "shortcut"), branches):
                block[key] = branch
            if any(map(_is_frozen, inner)) and all(_is_frozen(i) or torch_layers.holds_no_parameters(i) for i in inner):
                unwrapped = {**block, **{k: _frozen_layers(block[k]) for k in ("layers", "shortcut") if k in block}}
                layer = {"frozen": {"layers": [{"residual": unwrapped}]}}
            else:
                layer = {"residual": block}
        blocks.append(layer)
    merged: list[Json] = []
    waiting: list[Json] = []  # parameter-free layers after a frozen run
    for layer in blocks:
        if _is_frozen(layer) and merged and _is_frozen(merged[-1]):
            merged[-1] = {"frozen": {"layers": _frozen_layers([merged[-1], *waiting, layer])}}
            waiting = []
        elif torch_layers.holds_no_parameters(layer) and merged and _is_frozen(merged[-1]):
            waiting.append(layer)
        else:
            merged += waiting
            waiting = []
            merged.append(layer)
    return merged + waiting


def _first_table(module: nn.Module) -> torch.Tensor | None:
    """The table of ``module``'s first ``nn.Embedding``, which a tied head reads."""
    return next((m.weight for m in module.modules() if isinstance(m, nn.Embedding)), None)


def token_vocab(module: nn.Module) -> int | None:
    """The vocabulary when ``module`` reads token ids: its input goes first into an
    ``nn.Embedding``; else None."""
    first = next((m for m in module.modules() if not list(m.children())), None)
    return first.num_embeddings if isinstance(first, nn.Embedding) else None


def read_layers(module: nn.Module, shape: list[int]) -> tuple[list[Json], list[int]]:
    """``module``'s layer list over samples of ``shape`` (token ids when its first layer is an
    ``nn.Embedding``), and the shape it passes on."""
    try:
        graph = _Tracer().trace(module)
    except Exception as error:  # torch.fx's reason: control flow on values, an untraceable call
        raise UnsupportedModel(
            "model", module,
            f"torch.fx cannot trace it ({error}); headroom reads models fx can trace, or a JSON job",
        ) from None
    traced = fx.GraphModule(module, graph)
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            raise _refusal(traced, node, f"reads {node.target} directly; headroom reads layers")
    inputs = [node for node in traced.graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModel("model", module, f"takes {len(inputs)} inputs; headroom's models take one")
    shapes = _shapes(traced, module, shape, token_vocab(module) is not None)
    output = next(node for node in traced.graph.nodes if node.op == "output")
    (result,) = output.all_input_nodes or [None]
    if result not in shapes:
        raise UnsupportedModel("model", module, "returns something other than one tensor")
    reader = _Reader(traced, shapes)
    layers = merge_frozen(reader.chain(inputs[0], result))
    unused = next(reader.unread(), None)
    if unused is not None:
        raise _refusal(traced, unused, "its result is never used; headroom reads a model's path to its output")
    return layers, shapes[result]
