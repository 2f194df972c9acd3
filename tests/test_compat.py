"""The compatibility layer over transformers internals (vlm_compress/compat.py) on the installed version."""

import pytest
import torch
from packaging.version import Version

from vlm_compress import compat


def test_installed_transformers_is_inside_the_tested_range():
    low, high = (Version(v) for v in compat.TESTED_RANGE)
    assert low <= compat.TRANSFORMERS_VERSION <= high, (
        f"transformers {compat.TRANSFORMERS_VERSION} is outside the range CI tests {compat.TESTED_RANGE}: "
        "see README, 'Dependencies'"
    )


def test_the_range_matches_pyproject_and_the_two_lanes():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("transformers"))
    low, high = compat.TESTED_RANGE
    floor, ceiling = Version(low), Version(high)
    assert spec == f"transformers>={floor.major}.{floor.minor},<{ceiling.major}.{ceiling.minor + 1}"
    assert f"transformers=={low}\n" in (root / "requirements" / "oldest.txt").read_text()
    assert f"\ntransformers=={high}\n" in (root / "requirements" / "lock-cpu.txt").read_text()


def test_the_cache_is_found_under_either_argument_name():
    cache = object()
    assert compat.cache_of_call({"cache": cache}) is cache
    assert compat.cache_of_call({"past_key_values": cache, "use_cache": True}) is cache
    assert compat.cache_of_call({"use_cache": True}) is None


def test_cache_of_a_model_output_and_its_layers(model, batch):
    out = model(**batch, use_cache=True)
    cache = compat.cache_of_output(out)
    width = batch["input_ids"].shape[1]
    assert compat.cache_length(cache) == width and compat.has_layer_entries(cache)
    keys, values = compat.layer_entries(cache, 1)
    assert keys.shape[-2] == width and torch.equal(compat.layer_keys(cache, 1), keys)
    compat.replace_layer_entries(cache, 1, keys[:, :, :3], values[:, :, :3])
    assert compat.layer_entries(cache, 1)[0].shape[-2] == 3
    assert not compat.is_static_cache(cache)
    assert compat.cache_length(None) == 0


def test_cache_argument_name_matches_the_installed_decoder_layers(model):
    import inspect

    layer = model.model.language_model.layers[0]
    assert compat.CACHE_ARGUMENT in inspect.signature(layer.forward).parameters


def test_encoded_images_replace_the_vision_tower(model, batch):
    ref = model(**batch).logits
    feats = compat.image_features(model.model, batch["pixel_values"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **compat.encoded_images(feats))
    torch.testing.assert_close(out.logits, ref)


def test_rotary_tables_name_the_fix_when_missing():
    with pytest.raises(TypeError, match="position_embeddings"):
        compat.rotary_tables({"attention_mask": None})


def test_static_cache_requests_are_seen_from_the_call_or_the_generation_config(model):
    from transformers import GenerationConfig

    assert compat.requests_static_cache(model.generation_config, {"cache_implementation": "static"})
    assert not compat.requests_static_cache(model.generation_config, {})
    assert compat.requests_static_cache(GenerationConfig(cache_implementation="static"), {})


def test_a_transformers_older_than_the_floor_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", Version("5.17.0"))
    with pytest.raises(ImportError, match=r"needs transformers>=5.18.0.*found 5.17.0.*pip install 'transformers>=5.18.0'"):
        compat.check_supported()
