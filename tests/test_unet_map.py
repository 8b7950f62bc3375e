"""The one map of a UNet's attentions: roles, levels, the size rule and the attn_processors slots, against what
the diffusers modules really do."""

from __future__ import annotations

import pytest
import torch

from tcan_core.attention.unet_map import (ROLE_SPATIAL_CROSS, ROLE_SPATIAL_SELF, ROLE_TEMPORAL, build_unet_map,
                                          chain_size, level_size, unet_map)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slots_are_the_attn_processors_order(tiny_parts):
    unet = tiny_parts["unet"]
    order = [name.removesuffix(".processor") for name in unet.attn_processors]
    slots = unet_map(unet).slots()
    assert sorted(slots, key=slots.get) == order and sorted(slots.values()) == list(range(len(order)))
    cross = unet_map(unet).slots(ROLE_SPATIAL_CROSS)
    assert all(path.endswith("attn2") and slot % 2 == 1 for path, slot in cross.items())


def test_roles_and_levels_of_the_unet_and_the_motion_adapter(tiny_parts):
    unet, adapter = tiny_parts["unet"], tiny_parts["adapter"]
    mapped = unet_map(unet)
    selfs, crosses = mapped.with_role(ROLE_SPATIAL_SELF), mapped.with_role(ROLE_SPATIAL_CROSS)
    assert len(selfs) == len(crosses) > 0 and not mapped.with_role(ROLE_TEMPORAL)
    assert {s.level for s in mapped.with_role(ROLE_SPATIAL_SELF, ("mid",))} == {len(unet.down_blocks) - 1}
    temporal = unet_map(adapter).with_role(ROLE_TEMPORAL)
    assert temporal and all(s.slot is None for s in temporal)
    assert {s.level for s in temporal if s.block == "down"} == set(range(len(adapter.down_blocks)))
    with pytest.raises(ValueError, match="no attention at 'nowhere'"):
        mapped.site("nowhere")


def test_the_size_rule_is_what_the_unet_does_on_an_odd_latent(tiny_parts):
    unet, context = tiny_parts["unet"], tiny_parts["context"]
    latent = (9, 13)
    seen: dict[str, int] = {}
    handles = [unet.get_submodule(site.path).register_forward_pre_hook(
        lambda module, args, kwargs, path=site.path: seen.__setitem__(path, args[0].shape[1] if args else
                                                                       kwargs["hidden_states"].shape[1]),
        with_kwargs=True) for site in unet_map(unet).with_role(ROLE_SPATIAL_SELF)]
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 4, *latent), 10, encoder_hidden_states=context)
    finally:
        for handle in handles:
            handle.remove()
    for site in unet_map(unet).with_role(ROLE_SPATIAL_SELF):
        height, width = site.size(latent)
        assert seen[site.path] == height * width, site.path


def test_the_map_is_computed_once_per_model(tiny_parts):
    unet = tiny_parts["unet"]
    assert unet_map(unet) is unet_map(unet)
    assert build_unet_map(unet) == unet_map(unet)


def test_chain_size():
    assert level_size((9, 13), 2) == (3, 4)
    assert chain_size((8, 8), 2 * 16) == (4, 4) and chain_size((8, 8), 64) == (8, 8)
    assert chain_size((8, 8), 7) == (1, 1)
