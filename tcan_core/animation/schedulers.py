"""The samplers the TCAN Sampler offers, as diffusers schedulers with SD1.5's noise schedule.

TCAN samples with DDIM (Song et al., ICLR 2021), 25 steps, on the schedule AnimateDiff and the
authors' configs use: 1,000 training steps, betas linear from 0.00085 to 0.012, ``steps_offset``
1, no sample clipping. The other choices share that schedule so that switching sampler changes
only the integrator: Euler and Euler ancestral (Karras et al., NeurIPS 2022, Algorithm 2 and its
ancestral variant), DPM-Solver++(2M) (Lu et al. 2022) and UniPC (Zhao et al., NeurIPS 2023).
"""

from __future__ import annotations

from typing import Any

from ..bases import SD15

SCHEDULER_DDIM = "DDIM"
SCHEDULER_EULER = "Euler"
SCHEDULER_EULER_A = "Euler ancestral"
SCHEDULER_DPMPP_2M = "DPM++ 2M"
SCHEDULER_UNIPC = "UniPC"
SCHEDULERS = (SCHEDULER_DDIM, SCHEDULER_EULER, SCHEDULER_EULER_A, SCHEDULER_DPMPP_2M, SCHEDULER_UNIPC)
DEFAULT_SCHEDULER = SCHEDULER_DDIM

# The noise schedule of SD1.5 as AnimateDiff and TCAN's configs/train/*.yaml set it.
SD15_SCHEDULE: dict[str, Any] = dict(SD15.schedule)


def make_scheduler(name: str) -> Any:
    """A fresh diffusers scheduler for ``name`` (one of ``SCHEDULERS``) on SD1.5's noise schedule."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, UniPCMultistepScheduler)

    if name == SCHEDULER_DDIM:
        return DDIMScheduler(**SD15_SCHEDULE, clip_sample=False)
    if name == SCHEDULER_EULER:
        return EulerDiscreteScheduler(**SD15_SCHEDULE)
    if name == SCHEDULER_EULER_A:
        return EulerAncestralDiscreteScheduler(**SD15_SCHEDULE)
    if name == SCHEDULER_DPMPP_2M:
        return DPMSolverMultistepScheduler(**SD15_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
    if name == SCHEDULER_UNIPC:
        return UniPCMultistepScheduler(**SD15_SCHEDULE)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
