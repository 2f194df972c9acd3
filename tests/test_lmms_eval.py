"""The lmms-eval plugin (``vlm_compress_llava``) under lmms-eval's own evaluator, offline, on the shipped tiny LLaVA.

Needs the ``lmms`` extra (``pip install -e ".[test,lmms]"``): without lmms-eval these tests fail, they do not skip.
The task is ``tests/lmms_tasks/shapes_vqa`` (8 held-out ShapesVQA items, 96×96 images, 144 visual tokens each),
copied to a temporary folder with its parquet data file and loaded through ``datasets`` with the hub off.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import importlib.util
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import lmms_eval.models
import pytest
import torch
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from vlm_compress.bench.data import shapes_items
from vlm_compress.bench.run import Runner, load_model, normalise
from vlm_compress.integrations.lmms_eval import MODEL_ID, VLMCompressLlava, manifest

TINY = Path(__file__).resolve().parents[1] / "vlm_compress" / "assets" / "tiny-llava"
TASK_SRC = Path(__file__).parent / "lmms_tasks" / "shapes_vqa"
SAMPLES = 8
TOKENS = 144  # (96 / 8)² visual tokens per image
KEPT = 16  # round(0.11 · 144)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmms_tasks") / "shapes_vqa"
    shutil.copytree(TASK_SRC, folder, ignore=shutil.ignore_patterns("__pycache__", "*.parquet"))
    spec = importlib.util.spec_from_file_location("shapes_vqa_utils", folder / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    utils.write_dataset(folder, SAMPLES)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        yield TaskManager(include_path=str(folder.parent), include_defaults=False)


def evaluate(task_manager, model, model_args="", batch_size=1):
    return simple_evaluate(
        model=model, model_args=model_args, tasks=["shapes_vqa"], task_manager=task_manager, batch_size=batch_size,
        device="cpu", bootstrap_iters=0, log_samples=True, process_docs_parallel=1,
    )


@pytest.fixture(scope="module")
def compressed(task_manager):
    """By name, as the CLI does: the entry point resolves ``vlm_compress_llava``; budget 0.11, batches of 4."""
    return evaluate(task_manager, MODEL_ID, f"pretrained={TINY},method=cls_attn,budget=0.11", batch_size=4)


@pytest.fixture(scope="module")
def baseline(task_manager):
    """``method=none``, passed as an instance so that its ``request_stats`` stay readable."""
    lm = VLMCompressLlava.create_from_arg_string(f"pretrained={TINY},method=none", {"device": "cpu"})
    return evaluate(task_manager, lm), lm


def by_doc(result):
    return {s["doc_id"]: s for s in result["samples"]["shapes_vqa"]}


def test_entry_point_registers_the_model():
    (ep,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == MODEL_ID]
    assert ep.load()() == manifest()
    assert lmms_eval.models.get_model(MODEL_ID) is VLMCompressLlava


def test_plugin_module_imported_first_still_registers():
    """Importing the plugin before ``lmms_eval.models`` must not leave lmms-eval a half-initialised entry point."""
    code = (
        "import vlm_compress.integrations.lmms_eval as plugin, lmms_eval.models as models; "
        f"assert models.get_model({MODEL_ID!r}) is plugin.VLMCompressLlava"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Failed to load model entry-point" not in run.stdout + run.stderr


def test_compressed_run_scores_and_keeps_the_budget(compressed):
    accuracy = compressed["results"]["shapes_vqa"]["exact_match,none"]
    assert 0.0 <= accuracy <= 1.0
    assert len(compressed["samples"]["shapes_vqa"]) == SAMPLES
    throughput = compressed["throughput"]
    assert throughput["avg_visual_tokens_in_per_image"] == TOKENS
    assert throughput["avg_visual_tokens_kept_per_image"] == KEPT
    assert throughput["avg_prefill_ms"] > 0 and throughput["avg_prefill_gflops"] > 0
    assert compressed["efficiency"]["overall"]["docs_with_token_counts"] == SAMPLES


def test_baseline_keeps_every_token_and_compression_shortens_each_prompt(compressed, baseline):
    result, lm = baseline
    assert 0.0 <= result["results"]["shapes_vqa"]["exact_match,none"] <= 1.0
    assert len(lm.request_stats) == SAMPLES
    assert all(r.images == 1 and r.visual_tokens_in == r.visual_tokens_kept == TOKENS for r in lm.request_stats)
    assert all(r.prefill_ms > 0 and r.output_tokens >= 1 for r in lm.request_stats)
    assert result["throughput"]["avg_visual_tokens_kept_per_image"] == TOKENS
    assert result["throughput"]["avg_prefill_gflops"] > compressed["throughput"]["avg_prefill_gflops"]
    full, short = by_doc(result), by_doc(compressed)
    for doc_id, sample in full.items():
        (counts,) = sample["token_counts"]
        (compressed_counts,) = short[doc_id]["token_counts"]
        assert counts["input_tokens"] - compressed_counts["input_tokens"] == TOKENS - KEPT


def test_baseline_answers_match_the_benchmark_runner(baseline):
    """Same prompt format and greedy decoding as ``python -m vlm_compress.bench`` (the model's training prompt)."""
    result, _ = baseline
    model, processor = load_model(TINY, torch.device("cpu"), torch.float32)
    expected, _ = Runner(model, processor, shapes_items(SAMPLES), "USER: <image>\n{question} ASSISTANT:", 4, 4).answers()
    got = [normalise(s["resps"][0][0]) for s in sorted(result["samples"]["shapes_vqa"], key=lambda s: s["doc_id"])]
    assert got == expected


@pytest.mark.parametrize(("budget", "expected"), [("16", 16), ("0.11", 0.11), (16, 16), (0.2, 0.2)])
def test_budget_is_int_without_a_dot(budget, expected):
    lm = VLMCompressLlava(pretrained=str(TINY), budget=budget, device="cpu")
    assert lm.model.compression.config.budget == expected
    assert type(lm.model.compression.config.budget) is type(expected)


def test_model_args_string_and_method_options():
    lm = VLMCompressLlava.create_from_arg_string(f"pretrained={TINY},method=visionzip,budget=16,layer=-3")
    config = lm.model.compression.config
    assert (config.name, config.budget, config.layer) == ("visionzip", 16, -3)
    assert type(config.layer) is int
    assert lm.build_prompt("what color is the square ?", 1) == "USER: <image>\nwhat color is the square ? ASSISTANT:"


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="local checkpoint"):
        VLMCompressLlava(pretrained="llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ValueError, match="need a method"):
        VLMCompressLlava(pretrained=str(TINY), method="none", layer=-3)
    lm = VLMCompressLlava(pretrained=str(TINY), method="none", device="cpu")
    assert "compression" not in lm.model.__dict__
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])


def test_in_llm_method_reports_layer_averaged_tokens_and_its_own_flops(task_manager, baseline):
    """FastV drops tokens inside the LLM: every image enters whole, layers after K see fewer; the FLOPs and KV follow
    each layer's own count."""
    lm = VLMCompressLlava.create_from_arg_string(f"pretrained={TINY},method=fastv,budget=0.5,layer=1",
                                                 {"device": "cpu", "batch_size": 4})
    result = evaluate(task_manager, lm, batch_size=None)
    throughput, full = result["throughput"], baseline[0]["throughput"]
    assert throughput["avg_visual_tokens_kept_per_image"] == TOKENS  # all of them enter the LLM
    assert throughput["avg_layer_avg_visual_tokens_per_image"] == pytest.approx(0.5 * TOKENS, abs=1)
    assert full["avg_layer_avg_visual_tokens_per_image"] == TOKENS
    assert throughput["avg_prefill_gflops"] < 0.8 * full["avg_prefill_gflops"]
    assert throughput["avg_kv_cache_mb"] < 0.8 * full["avg_kv_cache_mb"]
    for record in lm.request_stats:  # prefill time per request: the batch's over its requests
        assert record.prefill_ms == pytest.approx(record.batch_prefill_ms / record.batch_size)
    assert {r.batch_size for r in lm.request_stats} == {4}


def test_lmms_eval_models_lists_the_plugin():
    run = subprocess.run([sys.executable, "-m", "lmms_eval", "models"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert MODEL_ID in run.stdout


def test_batch_size_given_twice_names_the_fix():
    with pytest.raises(ValueError, match="give it once, as lmms-eval's own --batch_size"):
        VLMCompressLlava.create_from_arg_string(f"pretrained={TINY},batch_size=2", {"batch_size": 4, "device": "cpu"})
    lm = VLMCompressLlava.create_from_arg_string(f"pretrained={TINY},batch_size=4", {"batch_size": 4, "device": "cpu"})
    assert lm.batch_size == 4


def test_the_task_writes_its_missing_data_file_where_the_yaml_is(tmp_path, monkeypatch):
    folder = tmp_path / "tasks" / "shapes_vqa"
    shutil.copytree(TASK_SRC, folder, ignore=shutil.ignore_patterns("__pycache__", "*.parquet"))
    monkeypatch.chdir(tmp_path)  # not the task's folder: the file must land next to the YAML
    spec = importlib.util.spec_from_file_location("shapes_vqa_utils_fresh", folder / "utils.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert (folder / "shapes_vqa.parquet").is_file() and not (tmp_path / "shapes_vqa.parquet").exists()
