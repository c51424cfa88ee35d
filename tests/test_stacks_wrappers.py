"""Copies of a recorded model, optimizer-like wrappers, a loss logged per micro-batch and tied
parameters, each against a reference that uses no gradflow code (see ``test_stacks``;
frozen and unfrozen layers: ``test_frozen``)."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from numpy.lib.recfunctions import repack_fields
from test_stacks import RTOL, Reference, Tied, batches, mlp
from torch import nn

from gradflow import GradflowError, Recorder, open_run
from gradflow.cli.main import main
from gradflow.report.data import payload


def _pickled(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def _saved(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": _pickled,
    "torch.save": _saved,
    "AveragedModel": torch.optim.swa_utils.AveragedModel,
}


@pytest.mark.parametrize("when", [0, 2], ids=["before-first-step", "after-two-steps"])
@pytest.mark.parametrize("how", list(COPIES))
def test_copies_of_a_recorded_model_are_inert(how: str, when: int, tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "r.h5"
    ref = Reference(model, ["0", "2", "4"])
    copied: nn.Module | None = None
    with Recorder(model, opt, path) as rec:
        for step, (x, y) in enumerate(batches(5)):
            if step == when:
                for handle in ref._handles:  # the reference's own hooks stay off the copy
                    handle.remove()
                copied = COPIES[how](model)
                ref.bind(model)
                copy_opt = torch.optim.SGD(copied.parameters(), lr=0.5)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            ref.weights_and_grads()
            opt.step()
            rec.log(loss=loss)
            ref.row()
            if copied is not None:  # the copy trains between the original's steps
                copy_opt.zero_grad()
                nn.functional.mse_loss(copied(x * 2), y).backward()
                copy_opt.step()
                if isinstance(copied, torch.optim.swa_utils.AveragedModel):
                    copied.update_parameters(model)
    ref.check(path)
    assert copied is not None and _saved(copied) is not None  # still copyable after closing


def test_scalar_logged_per_micro_batch_is_stored_as_the_mean(tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = Reference(model, ["0", "2", "4"])
    path = tmp_path / "r.h5"
    want = []
    data = batches(6)
    with Recorder(model, opt, path) as rec:
        for step in range(2):
            opt.zero_grad()
            losses = []
            for x, y in data[3 * step : 3 * step + 3]:  # three micro-batches a step
                loss = nn.functional.mse_loss(model(x), y) / 3
                loss.backward()
                rec.log(loss=loss if step == 0 else loss.item())  # tensors or numbers
                losses.append(loss.item())
            ref.weights_and_grads()
            opt.step()
            ref.row()
            want.append(np.mean(np.array(losses, dtype=np.float64)))
    ref.check(path)
    with open_run(path) as run:
        np.testing.assert_allclose(run.loss, want, rtol=RTOL)


class Lookahead:
    """An optimizer-like wrapper holding its optimizer as ``.base`` that changes the weights
    outside ``base.step()``: every second step they move half-way back to the slow ones."""

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base = base
        self.slow = [p.detach().clone() for g in base.param_groups for p in g["params"]]
        self.count = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def zero_grad(self) -> None:
        self.base.zero_grad()

    @torch.no_grad()
    def step(self) -> None:
        self.base.step()
        self.count += 1
        if self.count % 2 == 0:
            params = [p for g in self.param_groups for p in g["params"]]
            for p, slow in zip(params, self.slow, strict=True):
                slow.add_(p - slow, alpha=0.5)
                p.copy_(slow)


def _schedule_free(model: nn.Module) -> Any:
    schedulefree = pytest.importorskip("schedulefree")
    # SGD: the wrapper keeps its z buffer in the base optimizer's state, where Adam's
    # "empty state: initialise" check no longer sees an empty state.
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = schedulefree.ScheduleFreeWrapper(base, momentum=0.9)
    wrapper.train()
    return wrapper


@pytest.mark.parametrize(
    "make",
    [_schedule_free, lambda m: Lookahead(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))],
    ids=["ScheduleFreeWrapper", "own-base-wrapper"],
)
def test_update_is_the_change_across_the_wrappers_step(make, tmp_path) -> None:
    model = mlp()
    opt = make(model)
    ref = Reference(model, ["0", "2", "4"])
    path = tmp_path / "r.h5"
    with Recorder(model, opt, path) as rec:
        assert rec.optimizers == [opt]
        for x, y in batches(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            ref.weights_and_grads()
            opt.step()
            ref.row()
    ref.check(path)
    with open_run(path) as run:
        assert run.attrs["optimizer"] == type(opt).__name__


def test_object_without_step_and_param_groups_is_refused(tmp_path) -> None:
    class Holder:
        base = None

    with pytest.raises(GradflowError, match=r"Holder has no step\(\) and param_groups") as err:
        Recorder(mlp(), Holder(), tmp_path / "r.h5")
    assert "inner" not in str(err.value)


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_tied_parameters_name_every_module_sharing_them(tmp_path, capsys) -> None:
    model = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "r.h5"
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    with Recorder(model, opt, path, probes="param"):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        grad = model.transformer.wte.weight.grad.double().norm()
        opt.step()
    with open_run(path) as run:
        assert "lm_head" not in run.layer_names  # owns no parameter of its own
        wte = run.layers[run.layer_names.index("transformer.wte")]
        assert wte.aliases == ("lm_head",) and wte.label == "transformer.wte (also: lm_head)"
        assert [lay.name for lay in run.layers if lay.aliases] == ["transformer.wte"]
        # Both uses' gradients, summed into the one tensor.
        np.testing.assert_allclose(run.stat("param", "grad_norm")[0, wte.index], grad, rtol=RTOL)
        layers = payload([run])["runs"][0]["layers"]
        assert [lay["aliases"] for lay in layers if lay["aliases"]] == [["lm_head"]]
    with pytest.raises(SystemExit) as done:
        main(["info", str(path)])
    assert done.value.code == 0
    assert "transformer.wte (also: lm_head)" in capsys.readouterr().out


def test_layer_table_without_aliases_still_reads(tmp_path) -> None:
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "r.h5"
    x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(5))
    with Recorder(model, opt, path, probes="param"):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    with open_run(path) as run:
        assert [lay.aliases for lay in run.layers] == [("head",), ()]
    with h5py.File(path, "r+") as f:  # the layer table as files before aliases have it
        table = f["layers"][()]
        old = [name for name in table.dtype.names if name != "aliases"]
        del f["layers"]
        f.create_dataset("layers", data=repack_fields(table[old]))
    with open_run(path) as run:
        assert run.layer_names == ["embed", "head"]
        assert [lay.aliases for lay in run.layers] == [(), ()]
