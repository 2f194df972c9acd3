"""UnclipDecoder on a tiny StableUnCLIPImg2ImgPipeline built from configs (no download), saved and reloaded.

The components follow diffusers' own ``tests/pipelines/stable_unclip/test_stable_unclip_img2img.py``
(``get_dummy_components``), shrunk: 8×8 latents, a two-level VAE (16×16 images), two-layer CLIP encoders and a
byte-level CLIP tokenizer built in memory.
"""

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableUnCLIPImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
    StableUnCLIPImageNormalizer,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from vlm_compress.tokenizers_visual.unclip import UnclipDecoder

E = 32  # image-embedding width of the tiny pipeline (1024 for SD-2.1-unclip)
HIDDEN = 32
SIZE = 16  # UNet sample_size 8 × vae_scale_factor 2


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over the 256 byte-level symbols (with and without the ``</w>`` word end) and no merges."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_pipeline() -> StableUnCLIPImg2ImgPipeline:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    common = {"hidden_size": HIDDEN, "projection_dim": E, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 37}
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=4, **common))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                       max_position_embeddings=77, **common)
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        attention_head_dim=(2, 4),
        layers_per_block=1,
        cross_attention_dim=HIDDEN,
        class_embed_type="projection",
        # the class label is the image embedding concatenated with a noise-level embedding of the same width
        projection_class_embeddings_input_dim=2 * E,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        layers_per_block=1,
    )
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=E),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        # SD-2.1-unclip's denoising scheduler
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        vae=vae,
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: a second intra-op thread only contends (10× slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("unclip") / "unclip"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def decoder(folder):
    return UnclipDecoder.from_pretrained(folder, steps=2)


def embeds(batch: int = 2, width: int = E, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_decodes_to_unit_range_images(decoder):
    assert decoder.embedding_dim == E
    assert decoder.steps == 2 and decoder.guidance_scale == 10.0 and decoder.noise_level == 0
    images = decoder(embeds(2), generator=seeded())
    assert images.shape == (2, 3, SIZE, SIZE)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1


def test_same_seed_same_images(decoder):
    x = embeds(2)
    first = decoder(x, generator=seeded(3))
    assert torch.equal(first, decoder(x, generator=seeded(3)))
    assert not torch.equal(first, decoder(x, generator=seeded(4)))


def test_shared_latents_make_decoding_batch_independent(decoder):
    """SEED's fixed latents: an image decodes the same alone or in a batch (one latent shared by all)."""
    x = embeds(2)
    pair = decoder(x, generator=seeded(5))
    alone = decoder(x[:1], generator=seeded(5))
    torch.testing.assert_close(pair[:1], alone, atol=1e-4, rtol=0)


def test_height_and_width(folder):
    small = UnclipDecoder.from_pretrained(folder, steps=1, guidance_scale=1.0, height=8, width=24)
    assert small(embeds(1), generator=seeded()).shape == (1, 3, 8, 24)
    with pytest.raises(ValueError, match="multiple of 8"):
        UnclipDecoder(small.pipeline, height=12)


def test_wrong_embedding_width(decoder):
    with pytest.raises(ValueError, match=r"(?s)33-d.*32-d"):
        decoder(embeds(2, width=E + 1))
    with pytest.raises(ValueError, match=r"\[B, E\]"):
        decoder(torch.zeros(2, 4, E))


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-unclip"
    with pytest.raises(FileNotFoundError, match="no-such-unclip"):
        UnclipDecoder.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        UnclipDecoder.from_pretrained(tmp_path)


def test_seed_decodes_through_the_unclip_pipeline(decoder):
    """SEED's reconstructed image embedding is what the pipeline's ``image_embeds`` take (SEED-2 + SD-2.1-unCLIP)."""
    from vlm_compress.tokenizers_visual import SeedConfig, SeedTokenizer

    torch.manual_seed(0)
    seed = SeedTokenizer(SeedConfig(image_size=16, patch_size=4, vision_width=32, vision_depth=1, vision_heads=2,
                                    num_queries=4, hidden=32, qformer_layers=1, qformer_heads=2, intermediate=64,
                                    codebook_size=16, code_dim=4, decode_heads=2, image_down=[8, 4], embedding_dim=E,
                                    pixel_decoder=False), decoder=decoder).eval()
    ids = seed.encode(torch.rand(2, 3, 16, 16))
    out = seed.decode(ids, generator=seeded(0))
    assert out.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(out, decoder(seed.image_embedding(ids), generator=seeded(0)))
