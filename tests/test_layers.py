"""Layer discovery, kinds, eager names, forward order and the tensors a layer outputs
(gradflow.layers), each against expectations written out by hand for small models."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from gradflow.layers import (
    LayerSpec,
    discover_layers,
    eager_name,
    first_tensor,
    floating_tensors,
    layer_kind,
    order_by_first_call,
)


def _ids(params: list[nn.Parameter]) -> list[int]:
    return [id(p) for p in params]


# -- discover_layers ---------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.act = nn.ReLU()  # no parameters: not a layer
        self.proj = nn.Linear(4, 4)


class Net(nn.Module):
    """Registration order differs from alphabetical and from nesting depth."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3)
        self.body = nn.Sequential(Block(), Block())
        self.head = nn.Linear(4, 2)


def test_layers_in_registration_order_with_their_own_parameters() -> None:
    net = Net()
    layers = discover_layers(net)
    assert [lay.name for lay in layers] == [
        "stem",
        "body.0.norm",
        "body.0.proj",
        "body.1.norm",
        "body.1.proj",
        "head",
    ]
    assert [lay.reg_index for lay in layers] == list(range(6))
    for lay in layers:
        own = [lay.module.get_parameter("weight"), lay.module.get_parameter("bias")]
        assert _ids(lay.params) == _ids(own)
        assert lay.n_params == sum(p.numel() for p in own)
        assert lay.depth == -1  # set by order_by_first_call only
    assert layers[0].module is net.stem
    assert layers[0].n_params == 2 * 1 * 3 * 3 + 2


def test_tied_parameter_belongs_to_first_owner() -> None:
    embed, decode = nn.Embedding(10, 4), nn.Linear(4, 10)
    decode.weight = embed.weight
    tied_only = nn.Linear(4, 10, bias=False)
    tied_only.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "decode": decode, "tied_only": tied_only})
    layers = discover_layers(model)
    # tied_only owns nothing of its own: not a layer at all.
    assert [lay.name for lay in layers] == ["embed", "decode"]
    assert _ids(layers[0].params) == [id(embed.weight)]
    assert _ids(layers[1].params) == [id(decode.bias)]
    assert layers[1].n_params == 10


def test_frozen_layers_are_layers_with_only_trainable_params_measured() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    model[1].bias.requires_grad_(False)
    layers = discover_layers(model)
    assert [lay.name for lay in layers] == ["0", "1", "2"]
    assert _ids(layers[0].params) == []  # frozen: a layer, measured once it trains
    assert _ids(layers[0].owned) == [id(model[0].weight), id(model[0].bias)]
    assert _ids(layers[1].params) == [id(model[1].weight)]
    assert _ids(layers[1].owned) == [id(model[1].weight), id(model[1].bias)]


def test_parametrized_module_owns_its_originals() -> None:
    model = nn.Sequential(weight_norm(nn.Linear(3, 4)), nn.Linear(4, 2))
    lin = model[0]
    originals = [lin.get_parameter(f"parametrizations.weight.original{i}") for i in (0, 1)]
    layers = discover_layers(model)
    # The ParametrizationList that holds original0/1 is no layer of its own.
    assert [lay.name for lay in layers] == ["0", "1"]
    assert _ids(layers[0].params) == _ids([*originals, lin.get_parameter("bias")])
    assert layers[0].n_params == 4 + 12 + 4
    assert layers[0].info(0).shape == "4x1+4x3+4"


def test_root_owning_parameters_is_named_empty() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.lin = nn.Linear(2, 2)

    model = Scaled()
    layers = discover_layers(model)
    assert [lay.name for lay in layers] == ["", "lin"]
    assert _ids(layers[0].params) == [id(model.scale)]
    info = layers[0].info(0)
    assert (info.name, info.shape, info.n_params, info.type) == ("(root)", "1", 1, "Scaled")


def test_in_place_compiled_submodule_has_eager_names() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)))
    model[1] = torch.compile(model[1])  # type: ignore[assignment]  # wraps; compiles nothing
    names = [name for name, _ in model.named_modules()]
    assert "1._orig_mod.0" in names
    assert [lay.name for lay in discover_layers(model)] == ["0", "1.0", "1.1"]


# -- layer_kind and eager_name -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "kind"),
    [
        (nn.Conv1d(1, 1, 1), "conv"),
        (nn.Conv2d(1, 1, 1), "conv"),
        (nn.ConvTranspose3d(1, 1, 1), "conv"),
        (nn.Linear(1, 1), "linear"),
        (nn.Bilinear(1, 1, 1), "other"),
        (nn.BatchNorm1d(2), "bn"),
        (nn.SyncBatchNorm(2), "bn"),
        (nn.GroupNorm(1, 2), "gn"),
        (nn.LayerNorm(2), "ln"),
        (nn.InstanceNorm2d(2, affine=True), "in"),
        (nn.Embedding(3, 2), "embedding"),
        (nn.MultiheadAttention(4, 2), "attention"),
        (nn.MultiheadAttention(4, 2).out_proj, "linear"),
        (nn.PReLU(), "other"),
        (nn.Sequential(), "other"),
    ],
)
def test_layer_kind(module: nn.Module, kind: str) -> None:
    assert layer_kind(module) == kind


@pytest.mark.parametrize(
    ("name", "eager"),
    [
        ("", ""),
        ("_orig_mod", ""),
        ("_orig_mod.0", "0"),
        ("blk._orig_mod.conv", "blk.conv"),
        ("a._orig_mod.b._orig_mod.c", "a.b.c"),
        ("my_orig_mod.x", "my_orig_mod.x"),  # only whole name components are stripped
        ("a.b", "a.b"),
    ],
)
def test_eager_name(name: str, eager: str) -> None:
    assert eager_name(name) == eager


# -- order_by_first_call -----------------------------------------------------------------------
def _specs(*names: str) -> list[LayerSpec]:
    return [LayerSpec(name, nn.Identity(), [], reg_index=i) for i, name in enumerate(names)]


def _order(layers: list[LayerSpec], calls: list[str]) -> list[str]:
    call_order = {name: i for i, name in enumerate(calls)}
    ordered = order_by_first_call(layers, call_order)
    assert [lay.depth for lay in ordered] == list(range(len(ordered)))
    assert [lay.depth for lay in layers] == [
        [o.name for o in ordered].index(lay.name) for lay in layers
    ]
    return [lay.name for lay in ordered]


def test_called_layers_by_first_call() -> None:
    layers = _specs("a", "b", "c")
    assert _order(layers, ["", "c", "a", "b"]) == ["c", "a", "b"]


def test_never_called_layer_after_nearest_called_ancestor() -> None:
    layers = _specs("head", "attn", "attn.out_proj", "enc.ffn.deep", "norm", "enc.ffn.other")
    # attn.out_proj is used functionally (never called), enc.ffn is called but owns nothing;
    # enc is called before enc.ffn: the nearest called ancestor decides. Both come before
    # head, called after them.
    calls = ["", "enc", "norm", "attn", "enc.ffn", "head"]
    assert _order(layers, calls) == [
        "norm",
        "attn",
        "attn.out_proj",
        "enc.ffn.deep",
        "enc.ffn.other",
        "head",
    ]


def test_never_called_without_called_ancestor_last_in_registration_order() -> None:
    # The model itself ("") is called but counts as an ancestor of no layer.
    layers = _specs("z", "b.x", "a", "c")
    assert _order(layers, ["", "c", "a"]) == ["c", "a", "z", "b.x"]


def test_root_layer_placed_by_its_own_call() -> None:
    layers = _specs("", "lin", "unused")
    assert _order(layers, ["", "lin"]) == ["", "lin", "unused"]
    # Where the root was never called it goes last, with the rest never called.
    assert _order(_specs("", "lin", "unused"), ["lin"]) == ["lin", "", "unused"]


# -- first_tensor / floating_tensors -----------------------------------------------------------
@dataclass
class Output:
    logits: torch.Tensor
    mask: torch.Tensor
    hidden: tuple[torch.Tensor, ...] | None = None


def test_floating_tensors_in_nested_outputs() -> None:
    a, b, c, d = (torch.full((2,), float(i)) for i in range(4))
    ints = torch.arange(3)
    half = torch.ones(2, dtype=torch.float16)
    output = (
        ints,
        {"x": a, "skip": None, "nested": [b, (ints, c)]},
        Output(logits=d, mask=ints > 0, hidden=(half,)),
        "text",
        3.0,
    )
    found = list(floating_tensors(output))
    assert [t is e for t, e in zip(found, [a, b, c, d, half], strict=True)] == [True] * 5
    assert first_tensor(output) is a


@pytest.mark.parametrize(
    "output",
    [
        torch.arange(4),
        torch.ones(2, dtype=torch.bool),
        (torch.arange(2), {"k": torch.zeros(2, dtype=torch.int64)}),
        None,
        "a string",
        Output,  # the dataclass type, not an instance
        [],
    ],
)
def test_no_floating_tensor(output: object) -> None:
    assert first_tensor(output) is None
    assert list(floating_tensors(output)) == []


def test_first_tensor_of_a_tensor_and_a_dataclass() -> None:
    x = torch.randn(3, dtype=torch.float64)
    assert first_tensor(x) is x
    out = Output(logits=x, mask=torch.ones(1))
    assert first_tensor(out) is x
    assert list(floating_tensors(out))[1] is out.mask
