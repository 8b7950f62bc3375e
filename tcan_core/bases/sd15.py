"""What Stable Diffusion 1.5 is, in one place: the facts loaders, sampler, doctor and nodes read.

Text context: CLIP ViT-L/14, 768 wide, 77 tokens per prompt chunk. Latents: 4 channels at 1/8 of
the image, scaled by 0.18215 for the UNet (Rombach et al., CVPR 2022, section 3.3). Preview: the
linear latent -> RGB fit ComfyUI's and A1111's live previews use for SD1.x. Schedule: 1,000
training steps, betas linear from 0.00085 to 0.012, ``steps_offset`` 1 (AnimateDiff's and TCAN's
configs). TCAN puts temporal layers into the ControlNet's down blocks 2 and 3.
"""

from __future__ import annotations

from .facts import BaseModelFacts

SD15 = BaseModelFacts(
    name="SD1.5",
    context_width=768,
    context_tokens=77,
    latent_channels=4,
    latent_scale=0.18215,
    vae_factor=8,
    latent_rgb=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
    block_out_channels=(320, 640, 1280, 1280),
    schedule=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                  steps_offset=1),
    controlnet_temporal_blocks=(2, 3),
    fix={
        "checkpoint": "choose an SD1.5 checkpoint (v1-5-pruned-emaonly or an SD1.5 fine-tune) in the checkpoints "
                      "folder",
        "controlnet": "choose the SD1.5 OpenPose ControlNet, control_v11p_sd15_openpose",
        "motion": "choose an SD1.5 motion module such as mm_sd_v15_v2.ckpt or v3_sd15_mm.ckpt",
    },
)
