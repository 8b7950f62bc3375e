"""TCAN_MODEL: clones share weights, record their own patches, and patches never outlive a call."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from tcan_core.animation.model import TCANModel


@dataclass(frozen=True)
class AddPatch:
    """Adds ``value`` to the UNet's weight while applied (a stand-in with a visible effect)."""

    key: str
    value: float

    @contextlib.contextmanager
    def applied(self, model, run):
        original = model.unet.weight.detach().clone()
        with torch.no_grad():
            model.unet.weight.add_(self.value)
        try:
            yield
        finally:
            with torch.no_grad():
                model.unet.weight.copy_(original)


def base() -> TCANModel:
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    return TCANModel(unet=layer, vae=torch.nn.Identity(), text_encoder=torch.nn.Identity(), source="tiny")


def test_clone_shares_weights_and_keeps_the_input_unpatched():
    model = base()
    patched = model.with_patch(AddPatch("lora", 1.0))
    assert model.patches == () and len(patched.patches) == 1
    assert patched.unet is model.unet
    with patched.patched():
        assert torch.all(model.unet.weight == 1.0)
    assert torch.all(model.unet.weight == 0.0)


def test_branches_see_only_their_own_patches():
    model = base()
    a, b = model.with_patch(AddPatch("lora", 1.0)), model.with_patch(AddPatch("lora", 5.0))
    with a.patched():
        assert torch.all(a.unet.weight == 1.0)
    with b.patched():
        assert torch.all(b.unet.weight == 5.0)
    assert torch.all(model.unet.weight == 0.0)


def test_stacking_and_exclusive_kinds():
    model = base().with_patch(AddPatch("lora", 1.0)).with_patch(AddPatch("lora", 2.0))
    with model.patched():
        assert torch.all(model.unet.weight == 3.0)
    ptm = model.with_patch(AddPatch("ptm", 10.0)).with_patch(AddPatch("ptm", 20.0))
    assert [p.value for p in ptm.patches if p.key == "ptm"] == [20.0]
    assert ptm.patch("ptm").value == 20.0 and ptm.patch("controlnet") is None


def test_patches_are_removed_when_the_call_fails():
    model = base().with_patch(AddPatch("lora", 1.0)).with_patch(AddPatch("ptm", 2.0))
    with pytest.raises(KeyboardInterrupt):
        with model.patched():
            assert torch.all(model.unet.weight == 3.0)
            raise KeyboardInterrupt
    assert torch.all(model.unet.weight == 0.0)


def test_a_patch_that_fails_to_apply_undoes_the_earlier_ones():
    class Broken:
        key = "face_id"

        @contextlib.contextmanager
        def applied(self, model, run):
            raise ValueError("adapter does not fit")
            yield

    model = base().with_patch(AddPatch("lora", 1.0)).with_patch(Broken())
    with pytest.raises(ValueError, match="does not fit"):
        with model.patched():
            pass
    assert torch.all(model.unet.weight == 0.0)
