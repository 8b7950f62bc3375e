"""The one composable attention processor: contributions stack on one attention in order (two face adapters
together), each feature alone is still AttnProcessor2_0 where it should be, and every install is undone."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from tcan_core.attention import steps
from tcan_core.attention.context import append_tokens
from tcan_core.attention.processor import ComposedAttnProcessor, Contribution, contributing
from tcan_core.face import FaceAttnProcessor, FaceIDPatch, FaceState, load_face_adapter, load_id_animator
from tcan_core.tiny.face_adapter import build_tiny_clip_vision, write_tiny_id_animator, write_tiny_ip_faceid

pytestmark = pytest.mark.usefixtures("one_thread")


def cross_attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, bias=False).eval()


def face_branch(scale: float, tokens: int, seed: int) -> FaceAttnProcessor:
    g = torch.Generator().manual_seed(seed)
    return FaceAttnProcessor(FaceState(tokens, scale), torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g))


def test_no_contribution_is_attn_processor_2_0():
    attn = cross_attention()
    hidden, text = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    expected = AttnProcessor2_0()(attn, hidden, text)
    assert torch.equal(ComposedAttnProcessor()(attn, hidden, text), expected)


def test_two_face_branches_stack_in_order_on_one_attention():
    attn = cross_attention()
    hidden, text = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    face_a, face_b = torch.randn(1, 3, 12), torch.randn(1, 2, 12)
    first, second = face_branch(0.8, 3, 1), face_branch(0.5, 2, 2)
    first.contributions.append(second)
    out = first(attn, hidden, append_tokens(append_tokens(text, face_a), face_b))

    prepared = steps.begin(attn, hidden, text, None, None)
    query, key, value = steps.project(attn, prepared.hidden_states, text)
    plain = steps.multi_head_attention(attn, query, key, value)
    expected = plain + 0.8 * first._face_attention(attn, query, face_a) + 0.5 * second._face_attention(attn, query,
                                                                                                        face_b)
    assert torch.allclose(out, steps.finish(attn, expected, prepared.residual), atol=1e-6)
    alone = face_branch(0.8, 3, 1)(attn, hidden, append_tokens(text, face_a))
    assert not torch.allclose(out, alone, atol=1e-4)


class _Recorder(Contribution):
    def __init__(self) -> None:
        self.seen = []

    def observe(self, hidden_states: torch.Tensor) -> None:
        self.seen.append(tuple(hidden_states.shape))


def test_contributing_appends_to_a_composed_processor_and_restores_both_ways():
    attn = cross_attention()
    original = attn.processor
    a, b = _Recorder(), _Recorder()
    module = torch.nn.ModuleDict({"attn": attn})
    with contributing(module, {"attn": a}, lambda c: ComposedAttnProcessor([c])):
        installed = attn.processor
        assert isinstance(installed, ComposedAttnProcessor) and installed.contributions == [a]
        with contributing(module, {"attn": b}, lambda c: ComposedAttnProcessor([c])):
            assert attn.processor is installed and installed.contributions == [a, b]
            attn(torch.randn(1, 4, 16), torch.randn(1, 3, 12))
        assert installed.contributions == [a]
    assert attn.processor is original and a.seen == b.seen == [(1, 4, 16)]
    with pytest.raises(RuntimeError, match="boom"):
        with contributing(module, {"attn": a}, lambda c: ComposedAttnProcessor([c])):
            raise RuntimeError("boom")
    assert attn.processor is original


def test_id_animator_and_ip_adapter_faceid_together_in_the_sampler(tiny_parts, tmp_path):
    from tcan_core.animation.model import TCANModel
    from tcan_core.animation.sampler import SamplerSettings, sample_animation
    from tcan_core.animation.vae import DiffusersVAE
    from tcan_core.face import clip_image_embeddings

    unet = tiny_parts["unet"]
    animator = load_id_animator(write_tiny_id_animator(tmp_path / "animator.ckpt", unet), unet)
    faceid = load_face_adapter(write_tiny_ip_faceid(tmp_path / "faceid.bin", unet), unet)
    crops = clip_image_embeddings(build_tiny_clip_vision(), torch.rand(1, 224, 224, 3,
                                                                       generator=torch.Generator().manual_seed(2)))
    identity = torch.randn(512, generator=torch.Generator().manual_seed(3))
    base = TCANModel(unet, tiny_parts["vae"], tiny_parts["text"], "tiny")
    one = base.with_patch(FaceIDPatch(animator, crops))
    two = one.with_patch(FaceIDPatch(faceid, identity, key="face_id_2"))
    before = {name: module.processor for name, module in unet.named_modules() if isinstance(module, Attention)}
    g = torch.Generator().manual_seed(0)
    reference, poses = torch.rand(1, 64, 64, 3, generator=g), torch.rand(2, 64, 64, 3, generator=g)
    settings = SamplerSettings(width=64, height=64, steps=1)

    def frames(model):
        return sample_animation(model, reference, poses, tiny_parts["context"], tiny_parts["context"],
                                DiffusersVAE(tiny_parts["vae"]), settings, temporal=False).frames

    alone, both = frames(one), frames(two)
    assert bool(torch.isfinite(both).all()) and not torch.equal(alone, both)
    assert all(module.processor is before[name] for name, module in unet.named_modules() if name in before)
    assert torch.equal(frames(one), alone)
