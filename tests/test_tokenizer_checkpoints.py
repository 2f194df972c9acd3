"""Official checkpoint layouts → our modules: SEED-2's ``seed_quantizer.pt`` + EVA ViT, FlexTok's safetensors.

The checkpoints are synthetic: written here with the official parameter names and shapes (small widths), from
``AILab-CVC/SEED`` ``models/seed_qformer/qformer_quantizer.py`` / ``eva_vit.py`` and ``apple/ml-flextok``
(``flextok/utils/checkpoint.py`` stores the config in the safetensors header, one ``str()`` entry per key).
"""

import pytest
import torch
from safetensors.torch import save_file

from vlm_compress.tokenizers_visual import FlexTokConfig, FlexTokTokenizer
from vlm_compress.tokenizers_visual.checkpoints import (
    CheckpointError,
    load_flextok_official,
    load_seed_official,
    read_safetensors_metadata,
)

D, DV, Q, I, N_E, E_DIM, EMB = 24, 16, 32, 48, 64, 8, 20  # Q-Former width, ViT width, queries, FFN, codes, embedding


def rand(*shape):
    return torch.randn(*shape) * 0.1


def official_seed_quantizer(layers=2, freq=2, decode_depth=1, downs=(12, 6, 2)) -> dict:
    sd = {"query_tokens": rand(1, Q, D), "Qformer.bert.embeddings.LayerNorm.weight": 1 + rand(D),
          "Qformer.bert.embeddings.LayerNorm.bias": rand(D),
          "Qformer.bert.embeddings.position_ids": torch.arange(512)[None],  # buffer the loader ignores
          "ln_vision.weight": 1 + rand(DV), "ln_vision.bias": rand(DV),
          "quantize.embedding.weight": rand(N_E, E_DIM),
          "encode_task_layer.0.weight": rand(D, D), "encode_task_layer.0.bias": rand(D),
          "encode_task_layer.2.weight": rand(E_DIM, D), "encode_task_layer.2.bias": rand(E_DIM),
          "decode_task_layer.0.weight": rand(E_DIM, E_DIM), "decode_task_layer.0.bias": rand(E_DIM),
          "decode_task_layer.2.weight": rand(D, E_DIM), "decode_task_layer.2.bias": rand(D),
          "pos_embed_image": rand(1, Q, D), "distill_image_proj.weight": rand(EMB, Q * downs[-1]),
          "distill_image_proj.bias": rand(EMB)}
    for i in range(layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        names = ["attention"] + (["crossattention"] if i % freq == 0 else [])
        for name in names:
            width = DV if name == "crossattention" else D
            sd.update({p + f"{name}.self.query.weight": rand(D, D), p + f"{name}.self.query.bias": rand(D),
                       p + f"{name}.self.key.weight": rand(D, width), p + f"{name}.self.key.bias": rand(D),
                       p + f"{name}.self.value.weight": rand(D, width), p + f"{name}.self.value.bias": rand(D),
                       p + f"{name}.output.dense.weight": rand(D, D), p + f"{name}.output.dense.bias": rand(D),
                       p + f"{name}.output.LayerNorm.weight": 1 + rand(D), p + f"{name}.output.LayerNorm.bias": rand(D)})
        sd.update({p + "intermediate_query.dense.weight": rand(I, D), p + "intermediate_query.dense.bias": rand(I),
                   p + "output_query.dense.weight": rand(D, I), p + "output_query.dense.bias": rand(D),
                   p + "output_query.LayerNorm.weight": 1 + rand(D), p + "output_query.LayerNorm.bias": rand(D),
                   # the text FFN the official __init__ sets to None: may sit in a file, never loaded
                   p + "intermediate.dense.weight": rand(I, D)})
    for i in range(decode_depth):
        p = f"blocks_image.{i}."
        sd.update({p + "norm1.weight": 1 + rand(D), p + "norm1.bias": rand(D), p + "attn.qkv.weight": rand(3 * D, D),
                   p + "attn.qkv.bias": rand(3 * D), p + "attn.proj.weight": rand(D, D), p + "attn.proj.bias": rand(D),
                   p + "norm2.weight": 1 + rand(D), p + "norm2.bias": rand(D), p + "mlp.fc1.weight": rand(4 * D, D),
                   p + "mlp.fc1.bias": rand(4 * D), p + "mlp.fc2.weight": rand(D, 4 * D), p + "mlp.fc2.bias": rand(D)})
    widths = (D, *downs)
    for j in range(len(downs)):
        sd[f"image_down.{2 * j}.weight"] = rand(widths[j + 1], widths[j])
    return sd


def official_eva_vit(depth=1, patch=4, image=16, mlp=40) -> dict:
    n = (image // patch) ** 2 + 1
    sd = {"cls_token": rand(1, 1, DV), "pos_embed": rand(1, n, DV), "patch_embed.proj.weight": rand(DV, 3, patch, patch),
          "patch_embed.proj.bias": rand(DV)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + rand(DV), p + "norm1.bias": rand(DV), p + "attn.qkv.weight": rand(3 * DV, DV),
                   p + "attn.q_bias": rand(DV), p + "attn.v_bias": rand(DV), p + "attn.proj.weight": rand(DV, DV),
                   p + "attn.proj.bias": rand(DV), p + "norm2.weight": 1 + rand(DV), p + "norm2.bias": rand(DV),
                   p + "mlp.fc1.weight": rand(mlp, DV), p + "mlp.fc1.bias": rand(mlp), p + "mlp.fc2.weight": rand(DV, mlp),
                   p + "mlp.fc2.bias": rand(DV)})
    return sd


@pytest.fixture()
def seed_files(tmp_path):
    torch.manual_seed(0)
    quantizer, vit = official_seed_quantizer(), official_eva_vit()
    torch.save(quantizer, tmp_path / "seed_quantizer.pt")
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    return tmp_path, quantizer, vit


def test_seed_official_checkpoint_lands_on_our_modules(seed_files):
    path, quantizer, vit = seed_files
    model = load_seed_official(path / "seed_quantizer.pt", path / "eva_vit_g.pth", vision_heads=2, heads=2)
    c = model.config
    assert (c.num_queries, c.hidden, c.qformer_layers, c.cross_attention_freq, c.vision_width, c.intermediate) == (
        Q, D, 2, 2, DV, I)
    assert (c.codebook_size, c.code_dim, c.decode_depth, c.image_down, c.embedding_dim) == (N_E, E_DIM, 1, [12, 6, 2], EMB)
    assert (c.image_size, c.patch_size, c.vision_depth) == (16, 4, 1)
    ours = model.state_dict()
    checks = {
        "Qformer.layer.0.crossattention.self.key.weight": "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
        "Qformer.layer.1.output_query.LayerNorm.bias": "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias",
        "Qformer.embeddings_norm.weight": "Qformer.bert.embeddings.LayerNorm.weight",
        "quantize.embedding.weight": "quantize.embedding.weight", "image_down.4.weight": "image_down.4.weight",
        "blocks_image.0.attn.qkv.weight": "blocks_image.0.attn.qkv.weight",
    }
    for mine, theirs in checks.items():
        assert torch.equal(ours[mine], quantizer[theirs]), mine
    assert model.Qformer.layer[1].crossattention is None
    # EVA's q_bias/v_bias become the fused qkv bias [q, 0, v]
    bias = ours["visual_encoder.blocks.0.attn.qkv.bias"]
    assert torch.equal(bias, torch.cat([vit["blocks.0.attn.q_bias"], torch.zeros(DV), vit["blocks.0.attn.v_bias"]]))
    assert torch.equal(ours["visual_encoder.pos_embed"], vit["pos_embed"])
    ids = model.encode(torch.rand(2, 3, 16, 16))
    assert ids.shape == (2, Q)
    # the decode path of get_codebook_entry, computed by hand from the official tensors
    codes = quantizer["quantize.embedding.weight"][ids]
    x = torch.tanh(codes @ quantizer["decode_task_layer.0.weight"].T + quantizer["decode_task_layer.0.bias"])
    x = x @ quantizer["decode_task_layer.2.weight"].T + quantizer["decode_task_layer.2.bias"] + quantizer["pos_embed_image"]
    x = model.blocks_image[0](x)
    for j in range(3):
        x = x @ quantizer[f"image_down.{2 * j}.weight"].T
        x = torch.relu(x) if j < 2 else x
    expected = x.flatten(1) @ quantizer["distill_image_proj.weight"].T + quantizer["distill_image_proj.bias"]
    assert torch.allclose(model.image_embedding(ids), expected, atol=1e-5)


def test_seed_without_vit_weights_decodes_ids_but_refuses_to_encode(seed_files):
    path, _, _ = seed_files
    model = load_seed_official(path / "seed_quantizer.pt", heads=2)
    assert model.visual_encoder.cls_token.is_meta  # the 1B-parameter ViT is never allocated
    embedding = model.image_embedding(torch.zeros(1, Q, dtype=torch.long))
    assert embedding.shape == (1, EMB) and not embedding.is_meta and torch.isfinite(embedding).all()
    with pytest.raises(ValueError, match="vision_path"):
        model.encode(torch.rand(1, 3, 224, 224))


def test_seed_checkpoint_with_foreign_tensors_is_refused(tmp_path):
    sd = official_seed_quantizer()
    sd["reverse_tokens"] = rand(1, 4, D)
    torch.save(sd, tmp_path / "q.pt")
    with pytest.raises(CheckpointError, match="reverse_tokens"):
        load_seed_official(tmp_path / "q.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_seed_official(tmp_path / "missing.pt")


# ---- FlexTok --------------------------------------------------------------------------------------------
def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         sample_size=32).eval()


def as_official(model: FlexTokTokenizer) -> dict:
    """Our FlexTok's tensors under the official names (module_dict layout, [1, D, H, W] sin-cos posembs)."""
    sd, out = model.state_dict(), {}
    enc, dec = "encoder.module_dict.", "decoder.module_dict."
    grid = model.grid
    out[enc + "enc_patch_emb.patch_proj.weight"] = sd["enc_patch_emb.weight"]
    out[enc + "enc_patch_emb.patch_proj.bias"] = sd["enc_patch_emb.bias"]
    out[enc + "enc_posemb_module.posembs"] = sd["enc_posemb"].t().reshape(1, -1, grid, grid)
    out[enc + "enc_register_module.registers"] = sd["enc_registers"]
    out[enc + "enc_to_latents.proj.weight"] = sd["enc_to_latents.weight"]
    out[enc + "enc_to_latents.proj.bias"] = sd["enc_to_latents.bias"]
    out[dec + "dec_from_latents.proj.weight"] = sd["dec_from_latents.weight"]
    out[dec + "dec_from_latents.proj.bias"] = sd["dec_from_latents.bias"]
    out[dec + "dec_registers_posemb_module.posembs"] = sd["dec_register_posemb"]
    out[dec + "dec_nested_dropout.dropout_mask_token"] = sd["dec_mask_token"]
    out[dec + "dec_noise_patch_emb.patch_proj.weight"] = sd["dec_patch_emb.weight"]
    out[dec + "dec_noise_patch_emb.patch_proj.bias"] = sd["dec_patch_emb.bias"]
    out[dec + "dec_patches_posemb_module.posembs"] = sd["dec_posemb"].t().reshape(1, -1, grid, grid)
    for j in (0, 2):
        for p in ("weight", "bias"):
            out[dec + f"dec_time_embedder.mlp.{j}.{p}"] = sd[f"dec_time_mlp.{j}.{p}"]
    for side, blocks in (("enc", "enc_blocks"), ("dec", "dec_blocks")):
        root = (enc if side == "enc" else dec) + f"{side}_transformer.blocks."
        for key, value in sd.items():
            if key.startswith(blocks + "."):
                out[root + key[len(blocks) + 1:]] = value
    for p in ("weight", "bias"):
        out[dec + f"dec_to_patches.proj.{p}"] = sd[f"dec_to_patches.{p}"]
        out[dec + f"dec_to_patches.adaLN_modulation.1.{p}"] = sd[f"dec_out_modulation.1.{p}"]
    for key, value in model.vae.state_dict().items():
        out["vae.vae." + key] = value
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture()
def flextok_file(tmp_path):
    torch.manual_seed(0)
    config = FlexTokConfig(image_size=32, patch_size=2, width=32, heads=2, encoder_depth=2, decoder_depth=1,
                           registers=8, levels=[8, 8, 8, 5, 5, 5], adaln_groups=1)
    model = FlexTokTokenizer(config, vae=tiny_vae())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    metadata = {"regularizer": str({"_target_": "flextok.regularizers.quantize_fsq.FSQ", "levels": [8, 8, 8, 5, 5, 5]}),
                "encoder": str({"_target_": "flextok.model.utils.wrappers.SequentialModuleDictWrapper"})}
    save_file(as_official(model), str(tmp_path / "model.safetensors"), metadata=metadata)
    return tmp_path / "model.safetensors", model.eval()


def test_flextok_official_checkpoint_reproduces_the_model(flextok_file):
    path, original = flextok_file
    assert read_safetensors_metadata(path)["regularizer"]["levels"] == [8, 8, 8, 5, 5, 5]
    torch.manual_seed(123)
    loaded = load_flextok_official(path, vae=tiny_vae(), head_dim=16)  # a fresh VAE: its weights come from the file
    c = loaded.config
    assert (c.width, c.heads, c.registers, c.encoder_depth, c.decoder_depth, c.patch_size, c.image_size,
            c.adaln_groups) == (32, 2, 8, 2, 1, 2, 32, 1)
    pixels = torch.rand(2, 3, 32, 32)
    ids = original.encode(pixels)
    assert torch.equal(loaded.encode(pixels), ids)
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.allclose(loaded.decode(ids[:, :3], steps=2, generator=g()),
                          original.decode(ids[:, :3], steps=2, generator=g()), atol=1e-5)


def test_flextok_official_loader_errors(flextok_file, tmp_path):
    path, _ = flextok_file
    with pytest.raises(ValueError, match="vae_path"):
        load_flextok_official(path)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["decoder.module_dict.dec_repa_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="dec_repa_head"):
        load_flextok_official(tmp_path / "other.safetensors", vae=tiny_vae())
