"""A pluggable image decoder for SEED: image embeddings → pixels through a Stable-unCLIP pipeline.

SEED-2 (SEED-LLaMA, arXiv 2310.01218) does not decode its 32 causal codes to pixels itself: the codes are turned
back into one *image embedding* (the 1024-d OpenCLIP ViT-H/14 ``image_embeds`` that Stable unCLIP is conditioned
on), and ``stabilityai/stable-diffusion-2-1-unclip`` paints the image. The official decoder
(``AILab-CVC/SEED``, ``models/seed_llama_tokenizer.py``, ``ImageTokenizer.decode``) calls its copy of diffusers'
``StableUnCLIPImg2ImgPipeline`` with ``image_embeds=get_codebook_entry(indices)``, ``noise_level=0``,
``guidance_scale=10``, ``num_inference_steps=20`` and ``latents=self.latents``: one ``[1, 4, 96, 96]`` Gaussian
drawn once and reused for every image (768 px output).

:class:`UnclipDecoder` does the same with the upstream diffusers pipeline (read against diffusers 0.42.1,
``pipelines/stable_diffusion/pipeline_stable_unclip_img2img.py``):

* ``image=None`` and ``image_embeds=[B, E]``: the pipeline skips its CLIP image encoder entirely, noises the
  embedding to ``noise_level`` (``noise_image_embeddings``: normalise by ``image_normalizer``, ``add_noise`` at
  timestep ``noise_level``, un-normalise, concatenate a sinusoidal embedding of ``noise_level`` of the same width)
  and feeds the ``[B, 2E]`` result to the UNet as ``class_labels``. So the width the pipeline accepts is fixed by
  ``unet.config.projection_class_embeddings_input_dim // 2`` (and ``image_normalizer``'s ``embedding_dim``), not by
  the unused image encoder's ``projection_dim`` (the two agree for every released unCLIP checkpoint: 1024 for
  ``-2-1-unclip``, 768 for ``-2-1-unclip-small``). :attr:`UnclipDecoder.embedding_dim` reads the UNet.
* ``prompt=[""] * B``: the pipeline sizes its batch from the prompt, so a single ``""`` (its default, and what the
  official batch-1 call gets) would not match ``B > 1`` embeddings.
* Classifier-free guidance (``guidance_scale > 1``) uses an all-zero class label as the unconditional branch.
  SEED's own pipeline copy also takes ``negative_image_embeds``; upstream diffusers does not, so neither do we.
* "Fixed latents": by default one latent ``[1, C, h, w]`` is drawn from ``generator`` and shared by every image of
  the batch (``share_latents=True``), as SEED reuses ``self.latents``; an image then decodes the same whatever
  batch it is in. (Even at ``noise_level=0`` the pipeline adds ``sqrt(1 - alpha_bar_0) ≈ 0.0064`` standard
  deviations of noise to the normalised embedding, drawn from ``generator`` per row.) ``share_latents=False``
  lets the pipeline draw one latent per image.

Weights are never downloaded here: :meth:`UnclipDecoder.from_pretrained` loads a local folder
(``local_files_only=True``), e.g. one made by ``huggingface-cli download stabilityai/stable-diffusion-2-1-unclip
--local-dir PATH``. diffusers is an optional dependency (``pip install 'vlm-compress[tokenizers]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableUnCLIPImg2ImgPipeline

INSTALL_HINT = "pip install 'vlm-compress[tokenizers]'"
MODEL_INDEX = "model_index.json"  # what every saved diffusers pipeline folder holds


def _dtype_keyword() -> str:
    """``dtype`` where diffusers' ``from_pretrained`` takes it (diffusers PR #14205 deprecated ``torch_dtype`` for it;
    0.42.1 warns on ``torch_dtype``), ``torch_dtype`` on the releases before, which ignore ``dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


class UnclipDecoder:
    """Turns image embeddings ``[B, E]`` into images ``[B, 3, H, W]`` float in [0, 1] through a diffusers
    ``StableUnCLIPImg2ImgPipeline`` from a local folder.

    SEED-2 decodes its 1024-d reconstructed image embedding this way (arXiv 2310.01218; official
    ``models/seed_llama_tokenizer.py``): ``image_embeds=...``, ``noise_level=0``, ``guidance_scale=10``,
    ``num_inference_steps=20``, fixed latents. See the module docstring for how each maps onto the pipeline.

    Args:
        pipeline: a ``StableUnCLIPImg2ImgPipeline`` (or one with its components and call signature).
        steps: denoising steps (``num_inference_steps``).
        guidance_scale: classifier-free guidance weight; ``<= 1`` turns guidance off.
        noise_level: the noise-augmentation timestep of the embedding, ``0 <= noise_level < 1000``.
        height, width: output size in pixels, multiples of 8; ``None``: the UNet's ``sample_size × vae_scale_factor``
            (768 for SD-2.1-unclip).
        share_latents: one starting latent for the whole batch (SEED's fixed latents) rather than one per image.
    """

    def __init__(
        self,
        pipeline: StableUnCLIPImg2ImgPipeline,
        steps: int = 20,
        guidance_scale: float = 10.0,
        noise_level: int = 0,
        height: int | None = None,
        width: int | None = None,
        share_latents: bool = True,
    ):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        for name, size in (("height", height), ("width", width)):
            if size is not None and (size <= 0 or size % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (the pipeline's rule), got {size}")
        unet_config = pipeline.unet.config
        if getattr(unet_config, "class_embed_type", None) != "projection" or not getattr(
            unet_config, "projection_class_embeddings_input_dim", None
        ):
            raise ValueError(
                "the pipeline's UNet has no projected class embedding (class_embed_type='projection'), so it takes "
                "no image embedding: load a Stable-unCLIP pipeline such as stabilityai/stable-diffusion-2-1-unclip"
            )
        normalizer_dim = pipeline.image_normalizer.config.embedding_dim
        if unet_config.projection_class_embeddings_input_dim != 2 * normalizer_dim:
            raise ValueError(
                f"inconsistent unCLIP pipeline: unet.config.projection_class_embeddings_input_dim = "
                f"{unet_config.projection_class_embeddings_input_dim} but image_normalizer embedding_dim = "
                f"{normalizer_dim} (the UNet takes the embedding concatenated with a noise-level embedding of the "
                f"same width, so it should be {2 * normalizer_dim})"
            )
        self.pipeline = pipeline
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.noise_level = noise_level
        self.height = height
        self.width = width
        self.share_latents = share_latents

    @classmethod
    def from_pretrained(
        cls, path: str | Path, torch_dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> UnclipDecoder:
        """Load ``StableUnCLIPImg2ImgPipeline`` from the local folder ``path`` (no download) and wrap it.

        ``kwargs`` go to :class:`UnclipDecoder` (``steps``, ``guidance_scale``, ...). Raises ``FileNotFoundError``
        naming ``path`` when it is not a saved pipeline folder, ``ImportError`` when diffusers is missing.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no unCLIP pipeline folder at {path}: download one there first, e.g. "
                f"`huggingface-cli download stabilityai/stable-diffusion-2-1-unclip --local-dir {path}`"
            )
        if not (path / MODEL_INDEX).is_file():
            raise FileNotFoundError(
                f"{path} is not a saved diffusers pipeline (no {MODEL_INDEX}); expected the folder layout of "
                "stabilityai/stable-diffusion-2-1-unclip (model_index.json, unet/, vae/, text_encoder/, ...)"
            )
        try:
            from diffusers import StableUnCLIPImg2ImgPipeline
        except ImportError as err:
            raise ImportError(f"the unCLIP image decoder needs diffusers: {INSTALL_HINT}") from err
        pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(
            str(path), local_files_only=True, **{_dtype_keyword(): torch_dtype}
        )
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, **kwargs)

    @property
    def embedding_dim(self) -> int:
        """``E``, the image-embedding width the pipeline takes: half the UNet's class-embedding input (the other
        half is the noise-level embedding). 1024 for SD-2.1-unclip."""
        return self.pipeline.unet.config.projection_class_embeddings_input_dim // 2

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (its execution device, which differs from ``pipeline.device`` under
        CPU offload)."""
        return self.pipeline._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.unet.dtype

    def to(self, device: str | torch.device) -> UnclipDecoder:
        """Move the pipeline to ``device``; returns ``self``."""
        self.pipeline.to(device)
        return self

    def output_size(self) -> tuple[int, int]:
        """``(H, W)`` of decoded images."""
        default = self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor
        return self.height or default, self.width or default

    @torch.no_grad()
    def __call__(self, embeds: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image embeddings ``[B, E]`` → images ``[B, 3, H, W]``, float32 in [0, 1], on the CPU.

        ``generator`` seeds the starting latents and the embedding noise; the same seed gives the same images.
        """
        if embeds.ndim != 2:
            raise ValueError(f"embeds must be [B, E] image embeddings, got shape {tuple(embeds.shape)}")
        if embeds.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"embeds are {embeds.shape[-1]}-d but the unCLIP pipeline takes {self.embedding_dim}-d image "
                f"embeddings (unet.config.projection_class_embeddings_input_dim // 2). The SEED checkpoint and the "
                "unCLIP pipeline must share the image-embedding space: SEED-2 reconstructs 1024-d OpenCLIP ViT-H/14 "
                "embeddings for stabilityai/stable-diffusion-2-1-unclip (the 768-d -unclip-small does not fit)"
            )
        pipe = self.pipeline
        batch = embeds.shape[0]
        device, dtype = self.device, self.dtype
        embeds = embeds.to(device=device, dtype=dtype)
        height, width = self.output_size()
        latents = None
        if self.share_latents:
            from diffusers.utils.torch_utils import randn_tensor

            shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            # the pipeline scales only the latents it draws itself by init_noise_sigma (1 for DDIM, SD-2.1-unclip's)
            latents = (latents * pipe.scheduler.init_noise_sigma).repeat(batch, 1, 1, 1)
        out = pipe(
            image_embeds=embeds,
            prompt=[""] * batch,
            height=height,
            width=width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            noise_level=self.noise_level,
            generator=generator,
            latents=latents,
            output_type="pt",
        )
        return out.images.float().clamp(0, 1).cpu()  # "pt": [B, 3, H, W], already (x / 2 + 0.5).clamp(0, 1)

    def __repr__(self) -> str:
        height, width = self.output_size()
        return (
            f"{type(self).__name__}(embedding_dim={self.embedding_dim}, steps={self.steps}, "
            f"guidance_scale={self.guidance_scale}, noise_level={self.noise_level}, size={height}x{width}, "
            f"share_latents={self.share_latents})"
        )
