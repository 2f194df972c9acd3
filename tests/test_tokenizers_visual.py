"""Image tokenizers: quantizers, FlexTok's masks/prefixes/sampler, SEED's causal Q-Former, budgets, errors, weights."""

import pytest
import torch
import torch.nn.functional as F

from vlm_compress.tokenizers_visual import (
    FSQ,
    FlexTokConfig,
    FlexTokTokenizer,
    SeedConfig,
    SeedTokenizer,
    VectorQuantizer,
    VQGANConfig,
    VQGANTokenizer,
    build_clip_target,
    psnr,
    tiny_clip_config,
)
from vlm_compress.tokenizers_visual.checkpoints import load_tokenizer
from vlm_compress.tokenizers_visual.flextok import prefix_register_mask

FLEX = dict(image_size=16, patch_size=4, width=32, heads=2, encoder_depth=2, decoder_depth=2, registers=8,
            levels=[8, 5, 5, 5], timesteps=2)
SEED = dict(image_size=16, patch_size=4, vision_width=32, vision_depth=1, vision_heads=2, num_queries=6, hidden=32,
            qformer_layers=2, qformer_heads=2, intermediate=64, codebook_size=64, code_dim=8, decode_heads=2,
            image_down=[16, 4], embedding_dim=24)


def images(n=3, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def flextok(**overrides):
    torch.manual_seed(0)
    model = FlexTokTokenizer(FlexTokConfig(**{**FLEX, **overrides}))
    with torch.no_grad():  # zero-initialised output layers would make every decode identical
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def seed_model(**overrides):
    torch.manual_seed(0)
    config = SeedConfig(**{**SEED, **overrides})
    target = build_clip_target({**tiny_clip_config(24, 16), "vision_cfg": {"image_size": 16, "layers": 1, "width": 32,
                                                                            "patch_size": 4, "head_width": 16}})
    return SeedTokenizer(config, target=target).eval()


# ---- FSQ ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 8, 8, 5, 5, 5]])
def test_fsq_index_code_round_trip_covers_every_code(levels):
    fsq = FSQ(levels)
    expected = 1
    for level in levels:
        expected *= level
    assert fsq.num_codes == expected
    ids = torch.arange(fsq.num_codes)
    codes = fsq.indices_to_codes(ids)
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), ids)
    assert len({tuple(c.tolist()) for c in codes[:2000]}) == min(2000, fsq.num_codes)  # distinct codes
    # the forward pass quantises onto exactly these codes
    out = fsq(torch.randn(4, 50, len(levels)) * 3)
    assert torch.equal(fsq.indices_to_codes(out.indices), out.codes)


def test_fsq_rounding_is_straight_through_and_bounded():
    fsq = FSQ([8, 5])
    z = torch.randn(2, 7, 2, requires_grad=True)
    out = fsq(z)
    out.codes.sum().backward()
    bounded = fsq.bound(z.detach())
    assert (bounded.round().abs() <= torch.tensor([4, 2])).all()
    # STE: the gradient is that of bound(z)/half, not zero
    z2 = z.detach().clone().requires_grad_(True)
    (fsq.bound(z2) / torch.tensor([4.0, 2.0])).sum().backward()
    assert torch.allclose(z.grad, z2.grad)
    assert z.grad.abs().sum() > 0


# ---- VQ -------------------------------------------------------------------------------------------------
def test_vq_picks_the_nearest_code_and_its_loss_is_the_legacy_formula():
    vq = VectorQuantizer(3, 2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    z = torch.tensor([[[0.9, 0.2], [0.1, 1.4], [-0.3, 0.1]]], requires_grad=True)
    out = vq(z)
    assert out.indices.tolist() == [[1, 2, 0]]
    chosen = vq.embedding.weight[out.indices]
    expected = (chosen - z.detach()).pow(2).mean() + 0.25 * (chosen.detach() - z).pow(2).mean()
    assert torch.allclose(out.loss, expected)
    assert torch.equal(out.codes, chosen.detach().expand_as(out.codes))  # forward value is the code
    (out.codes.sum() + out.loss).backward()
    assert z.grad is not None and vq.embedding.weight.grad[:3].abs().sum() > 0


def test_vq_usage_and_dead_code_restart():
    vq = VectorQuantizer(16, 4).train()
    z = torch.randn(2, 10, 4) + 5  # far from the tiny initial codebook: few codes win
    vq(z)
    assert int(vq.usage.sum()) == 20
    dead_before = int((vq.usage == 0).sum())
    assert dead_before > 0
    moved = vq.restart_dead_codes(threshold=1, generator=torch.Generator().manual_seed(0))
    assert moved == dead_before and int(vq.usage.sum()) == 0
    # restarted codes now sit near encoder outputs, so more codes get used
    vq(z)
    assert int((vq.usage > 0).sum()) > 16 - dead_before


def test_out_of_range_and_non_integer_ids_raise_naming_the_range():
    fsq = FSQ([8, 5])
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        fsq.indices_to_codes(torch.tensor([40]))
    with pytest.raises(TypeError, match="integer tensor"):
        fsq.indices_to_codes(torch.tensor([1.0]))
    model = flextok()
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        model.decode(torch.tensor([[1000]]))
    with pytest.raises(ValueError, match="1 <= T <= 8"):
        model.decode(torch.zeros(1, 9, dtype=torch.long))


# ---- FlexTok --------------------------------------------------------------------------------------------
def test_flextok_encoder_mask_is_prefix_causal_over_registers():
    mask = prefix_register_mask(3, 4)
    assert mask[:3, :3].all() and not mask[:3, 3:].any()  # patches never see registers
    assert mask[3:, :3].all()  # registers see every patch
    assert torch.equal(mask[3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())


def test_flextok_register_i_never_depends_on_later_registers():
    model = flextok()
    pixels = images(2)
    patches = model.to_latent(pixels)
    before = model.encode_registers(patches)
    with torch.no_grad():
        model.enc_registers[5:] += 1.0
    after = model.encode_registers(patches)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_flextok_budget_prefixes_and_every_length_decodes():
    model = flextok()
    pixels = images(2)
    full = model.encode(pixels)
    assert full.shape == (2, 8) and full.dtype == torch.long
    assert torch.equal(model.encode(pixels, budget=3), full[:, :3])
    assert model.encode(pixels, budget=0.5).shape == (2, 4)  # share of max_tokens
    assert model.encode(pixels, budget=100).shape == (2, 8)  # an int above K keeps all
    for k in range(1, 9):
        out = model.decode(full[:, :k], steps=1, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="budget"):
        model.encode(pixels, budget=0)


def test_flextok_x_prediction_steps_with_the_velocity_it_implies():
    model = flextok(prediction="x")
    noised, t = torch.randn(2, 16, 48), torch.tensor([0.5, 0.02])
    registers = model.decoder_registers(model.quantizer.indices_to_codes(model.encode(images(2))), 8)
    x0 = model.network(noised, registers, t)
    expected = (noised - x0) / torch.tensor([0.5, 0.05])[:, None, None]  # t floored at 0.05
    assert torch.allclose(model.velocity(noised, registers, t), expected)


def test_flextok_truncated_tokens_equal_masking_the_rest():
    model = flextok()
    codes = model.quantizer.indices_to_codes(model.encode(images(2)))
    truncated = model.decoder_registers(codes[:, :3], 3)
    masked = model.decoder_registers(codes, 3)
    assert torch.equal(truncated, masked)
    assert torch.equal(masked[:, 3:], model.dec_mask_token.expand(2, 5, -1))
    assert not torch.equal(masked[:, :3], model.dec_mask_token.expand(2, 3, -1))


@pytest.mark.parametrize("groups", [1, 2])
def test_flextok_compact_registers_equal_padding_with_mask_tokens(groups):
    model = flextok(adaln_groups=groups)
    codes = model.quantizer.indices_to_codes(model.encode(images(2)))
    noised, t = torch.randn(2, 16, 48), torch.tensor([0.7, 0.2])
    for k in (0, 1, 3, 7, 8):  # 0: the null condition; 7: one masked register (no bias); 8: none masked
        part = codes[:, :k] if k else None
        padded = model.network(noised, model.decoder_registers(part, k, batch=2), t)
        registers, masked = model.compact_registers(part, batch=2)
        assert registers.shape[1] == min(k + 1, 8) and masked == 8 - k
        assert torch.allclose(model.network(noised, registers, t, masked), padded, atol=1e-5)


def test_flextok_grouped_training_loss_equals_padding_every_sample_to_k():
    model = flextok(cond_dropout=0.3)
    model.train()
    pixels = images(6)
    loss = model.training_loss(pixels, generator=torch.Generator().manual_seed(3))
    # the same draws, every sample padded to K registers with mask tokens (the official form)
    g = torch.Generator().manual_seed(3)
    keep = model.sample_keep(6, g)
    keep = torch.where(torch.rand(6, generator=g) < 0.3, 0, keep)
    assert len(keep.unique()) > 1  # the grouping is exercised
    t = torch.sigmoid(torch.randn(6, generator=g) + model.config.time_mean)
    x0 = model.to_latent(pixels)
    noise = torch.randn(x0.shape, generator=g)
    noised = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    registers = model.decoder_registers(model.quantizer(model.encode_registers(x0)).codes, keep)
    expected = F.mse_loss(model.network(noised, registers, t), noise - x0)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_flextok_decode_is_seeded_and_guidance_changes_it():
    model = flextok()
    ids = model.encode(images(2))
    a = model.decode(ids[:, :4], steps=3, generator=torch.Generator().manual_seed(1))
    b = model.decode(ids[:, :4], steps=3, generator=torch.Generator().manual_seed(1))
    c = model.decode(ids[:, :4], steps=3, generator=torch.Generator().manual_seed(2))
    g = model.decode(ids[:, :4], steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, g)


def test_flextok_batch_equals_single():
    model = flextok()
    pixels = images(3)
    ids = model.encode(pixels)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    batch = model.decode(ids[:, :5], steps=2, generator=g())
    for i in range(3):
        assert torch.equal(model.encode(pixels[i:i + 1]), ids[i:i + 1])
        assert torch.allclose(model.decode(ids[i:i + 1, :5], steps=2, generator=g()), batch[i:i + 1], atol=1e-5)


def test_flextok_encode_is_deterministic_and_the_vae_posterior_is_sampled_only_when_asked():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  sample_size=32).eval()
    model = FlexTokTokenizer(FlexTokConfig(**{**FLEX, "image_size": 32, "patch_size": 2}), vae=vae).eval()
    pixels = images(2, 32)
    assert model.encode(pixels).shape == (2, 8)
    assert torch.equal(model.encode(pixels), model.encode(pixels))
    with torch.no_grad():
        mode = model.to_latent(pixels)
        s1 = model.to_latent(pixels, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        s2 = model.to_latent(pixels, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        s3 = model.to_latent(pixels, sample_posterior=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and not torch.equal(mode, s1)
    assert model.decode(model.encode(pixels)[:, :2], steps=1).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="no VAE posterior"):
        flextok().encode(images(1), sample_posterior=True)


def test_flextok_with_a_vae_saves_and_loads_as_one_folder(tmp_path):
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  sample_size=32).eval()
    model = FlexTokTokenizer(FlexTokConfig(**{**FLEX, "image_size": 32, "patch_size": 2}), vae=vae).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "vae" / "config.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert loaded.vae is not None and loaded.config.vae_path is None
    pixels = images(2, 32)
    ids = model.encode(pixels)
    assert torch.equal(loaded.encode(pixels), ids)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.allclose(loaded.decode(ids, steps=2, generator=g()), model.decode(ids, steps=2, generator=g()))


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_flextok_training_loss_reaches_encoder_decoder_and_mask_token(prediction):
    model = flextok(prediction=prediction).train()
    loss = model.training_loss(images(4), generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name in ("enc_registers", "enc_patch_emb.weight", "dec_mask_token", "dec_to_patches.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    keep = model.sample_keep(1000, torch.Generator().manual_seed(0))
    assert set(keep.tolist()) == {1, 2, 4, 8}


def test_wrong_image_size_names_the_fix_and_resize_works():
    model = flextok()
    with pytest.raises(ValueError, match="16×16 images, got 20×20.*resize=True"):
        model.encode(images(1, 20))
    assert model.encode(model.preprocess(images(1, 20), resize=True)).shape == (1, 8)
    uint8 = (images(2).permute(0, 2, 3, 1) * 255).byte().numpy()
    assert torch.equal(model.encode(uint8), model.encode(torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255))


def test_flextok_save_load_round_trip(tmp_path):
    model = flextok()
    model.save_pretrained(tmp_path / "ft")
    loaded = load_tokenizer(tmp_path / "ft")
    pixels = images(2)
    ids = model.encode(pixels)
    assert torch.equal(loaded.encode(pixels), ids)
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(loaded.decode(ids, generator=g()), model.decode(ids, generator=g()))


def test_load_tokenizer_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_tokenizer(tmp_path / "nothing")
    flextok().save_pretrained(tmp_path / "ft")
    (tmp_path / "ft" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file.*save or copy the folder again"):
        load_tokenizer(tmp_path / "ft")


def test_flextok_runs_in_bfloat16():
    model = flextok().to(torch.bfloat16)
    ids = model.encode(images(2))
    out = model.decode(ids[:, :3], steps=1)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 16, 16)


# ---- SEED -----------------------------------------------------------------------------------------------
def test_seed_qformer_is_causal_over_queries():
    model = seed_model()
    pixels = images(2)
    before = model.query_features(pixels)
    with torch.no_grad():
        model.query_tokens[:, 4:] += 1.0
    after = model.query_features(pixels)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)  # query i never sees j > i
    assert not torch.allclose(before[:, 4:], after[:, 4:])
    assert torch.equal(model.Qformer.causal_mask, torch.ones(6, 6, dtype=torch.bool).tril())
    # cross-attention on every cross_attention_freq-th layer, as BLIP-2
    assert [layer.crossattention is not None for layer in model.Qformer.layer] == [True, False]


def test_seed_budget_prefix_decode_and_embed():
    model = seed_model()
    pixels = images(3)
    ids = model.encode(pixels)
    assert ids.shape == (3, 6) and int(ids.max()) < 64
    assert torch.equal(model.encode(pixels, budget=2), ids[:, :2])
    assert torch.equal(model.encode(pixels[1:2]), ids[1:2])  # batch equals single
    assert torch.allclose(model.decode(ids[1:2]), model.decode(ids)[1:2], atol=1e-5)
    assert model.embed(ids[:, :2]).shape == (3, 2, 8)
    assert torch.equal(model.embed(ids), model.quantize.embedding.weight[ids])
    assert model.decode(ids).shape == (3, 3, 16, 16)
    assert model.image_embedding(ids).shape == (3, 24)
    with pytest.raises(ValueError, match="all 6 codes"):
        model.decode(ids[:, :3])


def test_seed_training_loss_and_dead_code_restart():
    model = seed_model(restart_every=1).train()
    loss = model.training_loss(images(4))
    loss.backward()
    for name in ("query_tokens", "quantize.embedding.weight", "distill_image_proj.weight", "pixel_decoder.inp.weight",
                 "visual_encoder.cls_token"):
        assert model.get_parameter(name).grad is not None, name
    assert all(p.grad is None for p in model.target.parameters())  # the CLIP target is frozen
    assert int(model.quantize.usage.sum()) == 4 * 6
    model.after_step(0)
    assert int(model.quantize.usage.sum()) == 0  # restarted and reset
    figures = model.eval().evaluate(images(4))
    assert set(figures) >= {"embedding_cosine", "centered_cosine", "retrieval_at_1", "codes_used", "pixel_psnr"}


def test_seed_save_load_round_trip_with_its_clip_target(tmp_path):
    model = seed_model()
    model.save_pretrained(tmp_path / "seed", dtype=torch.float16)
    loaded = load_tokenizer(tmp_path / "seed")
    assert (tmp_path / "seed" / "target" / "open_clip_config.json").is_file()
    pixels = images(2)
    with torch.no_grad():
        assert torch.equal(loaded.target_embedding(pixels), model.target_embedding(pixels))
    assert loaded.encode(pixels).shape == (2, 6)
    assert loaded.quantize.embedding.weight.dtype == torch.float32


# ---- grid VQ (LlamaGen-style) ----------------------------------------------------------------------------
def vqgan(**overrides):
    torch.manual_seed(0)
    config = dict(image_size=16, base_channels=8, channel_mult=[1, 2, 2], codebook_size=32, code_dim=4)
    return VQGANTokenizer(VQGANConfig(**{**config, **overrides})).eval()


def test_vqgan_encodes_a_grid_and_embeds_the_unit_codes_it_looked_up():
    model = vqgan()
    pixels = images(3)
    ids = model.encode(pixels)
    assert ids.shape == (3, 16) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 32
    out = model.decode(ids)
    assert out.shape == (3, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    z = F.normalize(model.encoder(pixels * 2 - 1).flatten(2).transpose(1, 2), dim=-1)
    assert torch.equal(ids, (z @ model.codebook().t()).argmax(-1))  # cosine nearest = L2 nearest on the sphere
    assert torch.allclose(model.embed(ids).norm(dim=-1), torch.ones(3, 16))
    for i in range(3):  # batch equals single
        assert torch.equal(model.encode(pixels[i:i + 1]), ids[i:i + 1])
        assert torch.allclose(model.decode(ids[i:i + 1]), out[i:i + 1], atol=1e-6)


def test_vqgan_refuses_partial_grids_naming_the_fix():
    model = vqgan()
    with pytest.raises(ValueError, match="budget=None"):
        model.encode(images(1), budget=8)
    with pytest.raises(ValueError, match="all 16 codes"):
        model.decode(torch.zeros(1, 8, dtype=torch.long))


def test_vqgan_warms_up_as_an_autoencoder_then_seeds_its_codebook_from_encoder_outputs():
    model = vqgan(ae_warmup=2, restart_every=0)
    model.train()
    assert torch.allclose(model.quantizer.embedding.weight.norm(dim=-1), torch.ones(32))  # unit codes at init
    pixels = images(4)
    with torch.no_grad():
        model.quantizer.embedding.weight.mul_(-1)  # any codebook: the warm-up loss never reads it
    warm = model.training_loss(pixels)
    with torch.no_grad():
        model.quantizer.embedding.weight.normal_()
    assert torch.equal(model.training_loss(pixels), warm)
    model.after_step(0)
    model.after_step(1)  # the warm-up ends: every code is moved onto an encoder output of the last batch
    inputs = model.quantizer._last_inputs
    nearest = torch.cdist(model.quantizer.codebook, inputs).min(1).values
    assert nearest.max() < 0.05 and int(model.steps_trained) == 2
    assert not torch.equal(model.training_loss(pixels), warm)  # quantised from now on


def test_vqgan_save_load_round_trip(tmp_path):
    model = vqgan()
    model.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, VQGANTokenizer)
    pixels = images(2)
    ids = model.encode(pixels)
    assert torch.equal(loaded.encode(pixels), ids)
    assert torch.allclose(loaded.decode(ids), model.decode(ids))


def test_psnr_matches_its_formula():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)
    assert torch.allclose(psnr(a, b), torch.tensor([20.0]), atol=1e-4)
    assert F.mse_loss(a, b) > 0
