"""Attention primitives shared by every feature that changes attention (reference, TPC, PTM, face adapters).

Neutral ground below :mod:`tcan_core.animation` and :mod:`tcan_core.face`: it imports neither.
:mod:`.steps` holds the steps of diffusers' ``AttnProcessor2_0``; :mod:`.context` the extra
tokens appended after the text context.
"""
