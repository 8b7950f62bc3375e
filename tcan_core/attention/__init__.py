"""Attention primitives shared by every feature that changes attention (reference, TPC, PTM, face adapters).

Neutral ground below :mod:`tcan_core.animation` and :mod:`tcan_core.face`: it imports neither.
:mod:`.steps` holds the steps of diffusers' ``AttnProcessor2_0``; :mod:`.processor` the one
composable processor and its contributions; :mod:`.unet_map` the one map of a UNet's attentions
(role, level, size rule, ``attn_processors`` slot); :mod:`.context` the extra tokens appended
after the text context.
"""
