"""The shipped models load offline with stock classes, and the benchmark's --quick run works end to end."""

import json

import pytest
import torch

from vlm_compress import compress
from vlm_compress.bench.data import (
    ASSETS, EMBEDDED_MODELS, answer_prior, jsonl_items, shapes_items, task_for, video_items,
)
from vlm_compress.bench.run import main
from vlm_compress.bench.run import measure as measure_row
from vlm_compress.bench.task import ANSWERS

TINY = ASSETS / "tiny-llava"
NEXT = ASSETS / "tiny-llava-next"
ONEVISION = ASSETS / "tiny-onevision"
CLASSES = {"tiny-llava": "LlavaForConditionalGeneration", "tiny-llava-next": "LlavaNextForConditionalGeneration",
           "tiny-onevision": "LlavaOnevisionForConditionalGeneration", "tiny-qwen2-vl": "Qwen2VLForConditionalGeneration"}
# visual tokens per image: a 12×12 grid; a 12×12 thumbnail + 24×24 from 2×2 crops + 24 newlines; per clip: 8 frames
# of 12×12 pooled to 6×6 + the closing newline; Qwen2-VL: 24×24 patches of 4 pixels merged 2×2
VISUAL_TOKENS = {"tiny-llava": 144, "tiny-llava-next": 144 + 576 + 24, "tiny-onevision": 8 * 36 + 1,
                 "tiny-qwen2-vl": 144}


def load(name):
    import transformers
    from transformers import AutoProcessor

    cls = getattr(transformers, CLASSES[name])
    return cls.from_pretrained(ASSETS / name, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(ASSETS / name)


@pytest.fixture(scope="module")
def shipped():
    return load("tiny-llava")


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_shipped_models_load_offline_and_answer(name):
    model, processor = load(name)
    task = task_for(ASSETS / name, model.config)
    if name == "tiny-onevision":
        items = video_items(6, "test", task)
        inputs = processor(videos=[i.video for i in items], return_tensors="pt", padding=True,
                           text=[f"USER: <video>\n{i.question} ASSISTANT:" for i in items])
        placeholder = model.config.video_token_id
    else:
        items = shapes_items(6, task=task)
        inputs = processor(images=[i.image for i in items], return_tensors="pt", padding=True,
                           text=[f"USER: <image>\n{i.question} ASSISTANT:" for i in items])
        placeholder = model.config.image_token_id
    assert (inputs["input_ids"] == placeholder).sum(1).tolist() == [VISUAL_TOKENS[name]] * 6
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(a.strip() in ANSWERS for a in answers), answers


def test_shipped_weights_are_small():
    sizes = [sum(f.stat().st_size for f in (ASSETS / name).glob("*.safetensors")) for name in EMBEDDED_MODELS]
    assert all(s > 0 for s in sizes) and sum(sizes[:2]) <= 25 * 2**20  # the limit for the two image models
    assert sizes[2] <= 10 * 2**20 and sizes[3] <= 10 * 2**20  # the video model's, the Qwen model's


def test_quick_bench_run_on_anyres_model(tmp_path):
    stem = tmp_path / "quick_next"
    main(["--quick", "--model", str(NEXT), "--out", str(stem), "--samples", "6", "--batch-size", "6",
          "--methods", "cls_attn"])
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert rows[0]["llm_visual_tokens"] == VISUAL_TOKENS["tiny-llava-next"]
    assert rows[1]["agreement"] == 1.0  # budget 1.0
    assert rows[2]["llm_visual_tokens"] == round(0.22 * VISUAL_TOKENS["tiny-llava-next"])


def test_bench_run_on_the_video_model(tmp_path):
    """QuoTA beside its uniform split on the shipped video model: identity at 1.0, exact counts, scoring costs."""
    stem = tmp_path / "video"
    main(["--model", str(ONEVISION), "--out", str(stem), "--samples", "4", "--batch-size", "4", "--repeats", "1",
          "--methods", "quota", "quota:assign=uniform", "--budgets", "1.0", "0.25"])
    rows = {(r["method"], r["budget"]): r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]}
    full = VISUAL_TOKENS["tiny-onevision"]
    assert rows[("none", 1.0)]["llm_visual_tokens"] == full
    assert rows[("quota", 1.0)]["agreement"] == 1.0 and rows[("quota", 1.0)]["scoring_ms"] == 0
    for method in ("quota", "quota:assign=uniform"):
        assert rows[(method, 0.25)]["llm_visual_tokens"] == round(0.25 * full)
    assert rows[("quota", 0.25)]["scoring_ms"] > 0 and rows[("quota:assign=uniform", 0.25)]["scoring_ms"] == 0
    assert "Scoring passes" in stem.with_suffix(".md").read_text()


def test_compress_works_on_the_shipped_model(shipped):
    model, processor = shipped
    item = shapes_items(1)[0]
    inputs = processor(images=item.image, text=f"USER: <image>\n{item.question} ASSISTANT:", return_tensors="pt")
    compress(model, budget=0.11, method="cls_attn")
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert model.compression.stats.kept_per_image == [16]  # round(0.11 · 144)
    finally:
        from vlm_compress import restore

        restore(model)


def test_quick_bench_run(tmp_path):
    stem = tmp_path / "quick"
    main(["--quick", "--model", str(TINY), "--out", str(stem), "--samples", "24", "--batch-size", "12"])
    result = json.loads(stem.with_suffix(".json").read_text())
    rows = result["rows"]
    assert {r["method"] for r in rows} == {"none", "random", "pool"}
    assert {r["budget"] for r in rows if r["method"] != "none"} == {1.0, 0.22}
    full = rows[0]
    assert full["llm_visual_tokens"] == 144 and full["agreement"] == 1.0
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["prefill_ms"] > 0
        if r["budget"] == 1.0:  # identity at full budget
            assert r["agreement"] == 1.0 and r["accuracy"] == full["accuracy"]
    pooled = [r for r in rows if r["method"] == "pool" and r["budget"] == 0.22][0]
    assert pooled["llm_visual_tokens"] == 25 and pooled["kv_cache_mb"] < full["kv_cache_mb"]  # 5×5 grid
    assert "| random | 0.22 |" in stem.with_suffix(".md").read_text()
    assert 0 < result["answer_prior"] < 0.6


def test_jsonl_dataset(tmp_path):
    items = shapes_items(3)
    lines = []
    for n, item in enumerate(items):
        item.image.save(tmp_path / f"{n}.png")
        lines.append(json.dumps({"image": f"{n}.png", "question": item.question, "answer": item.answer}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    loaded = jsonl_items(tmp_path / "data.jsonl")
    assert [i.answer for i in loaded] == [i.answer for i in items] and loaded[0].image.size == (96, 96)
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        jsonl_items(tmp_path / "bad.jsonl")


def test_answer_prior_uses_majority_per_type():
    items = shapes_items(300, "train")
    assert 0.25 < answer_prior(items, items) < 0.5


def test_answer_matching():
    from vlm_compress.bench.run import is_correct, normalise

    assert is_correct(normalise(" Red "), "red") and is_correct("red red", "red")
    assert not is_correct("green", "red") and not is_correct("", "red")
    assert is_correct("top left corner", "top left") and not is_correct("top", "top left")


def test_method_specs_with_options():
    from vlm_compress.bench.run import parse_method

    assert parse_method("random") == ("random", {})
    assert parse_method("cls_attn:layer=-1,kind=logits") == ("cls_attn", {"layer": -1, "kind": "logits"})
    assert parse_method("visionzip:contextual_ratio=0.25") == ("visionzip", {"contextual_ratio": 0.25})
    with pytest.raises(ValueError, match="key=value"):
        parse_method("cls_attn:layer")


def test_stacked_method_specs_build_one_config_per_stage(model, batch):
    from vlm_compress import compress
    from vlm_compress.bench.run import method_arg
    from vlm_compress.pruners.mustdrop import MustDropPruner
    from vlm_compress.pruners.mustdrop_llm import MustDropLLMPruner

    assert method_arg("fastv:layer=1", 0.5) == ("fastv", {"budget": 0.5, "layer": 1})
    stack, options = method_arg("mustdrop+mustdrop_llm:mode=official", 0.25)
    assert options == {} and [type(c) for c in stack] == [MustDropPruner, MustDropLLMPruner]
    assert stack[1].mode == "official" and [c.budget for c in stack] == [0.5, 0.5]  # 0.5 · 0.5 = 0.25 overall
    assert [c.budget for c in method_arg("random+fastv", 16)[0]] == [16, 16]
    compress(model, method=stack)
    assert [c.budget for c in model.compression.configs] == [0.5, 0.5]


def shapes_accuracy(model, processor, items):
    inputs = processor(images=[i.image for i in items], text=[f"USER: <image>\n{i.question} ASSISTANT:" for i in items],
                       return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(a.strip() == i.answer for a, i in zip(answers, items)) / len(items)


def test_shipped_pmod_checkpoint_routes_and_answers():
    from vlm_compress import restore
    from vlm_compress.bench.run import load_model
    from vlm_compress.modules.pmod import TokenRouters

    path = ASSETS / "tiny-llava-pmod"
    model, processor = load_model(path, torch.device("cpu"), torch.float32)
    routers = TokenRouters.load(path)
    # trained, not the zero init; the last layer's router gets no gradient (see the pmod docstring) and stays zero
    assert all(routers.routers[str(layer)].weight.abs().sum() > 0 for layer in (0, 1, 2))
    items = shapes_items(20)
    compress(model, budget=0.5375, method="pmod")  # R̄ = 0.5 on 4 layers: ratios 1, .75, .25, .15
    try:
        accuracy = shapes_accuracy(model, processor, items)
        assert model.compression.stats.layer_visual_tokens == [144.0, 108.0, 36.0, 21.0]
    finally:
        restore(model)
    assert accuracy >= 0.8  # the trained model answers with its routing (random tokens: ~0.5 at this budget)


def test_shipped_atp_heads_track_the_budget(shipped):
    from vlm_compress import restore
    from vlm_compress.pruners.atp import ATPPruner

    model, processor = shipped
    items = shapes_items(20)
    shares = {}
    for budget in (0.7, 0.35):
        compress(model, budget=budget, method="atp")
        try:
            shapes_accuracy(model, processor, items)
            shares[budget] = model.compression.stats.layer_avg_visual_tokens / 144
        finally:
            restore(model)
    assert shares[0.7] > shares[0.35] and abs(shares[0.35] - 0.35) < 0.1
    assert ATPPruner().scoring_layers(4) == (0, 1, 2)


# -- a bench that loses nothing ---------------------------------------------------------------------------------


def quick_args(stem, *extra):
    return ["--quick", "--model", str(TINY), "--out", str(stem), "--samples", "6", "--batch-size", "6",
            "--repeats", "1", *extra]


def counting_measure(monkeypatch, fail=(), interrupt_after=None):
    """Replace the bench's per-row measurement: count calls, raise for the ``fail`` methods, or stop the process
    (KeyboardInterrupt) once ``interrupt_after`` rows have been measured."""
    from vlm_compress.bench import run as bench

    calls = []

    def measure(runner, method, budget, repeats):
        if interrupt_after is not None and len(calls) == interrupt_after:
            raise KeyboardInterrupt
        calls.append((method, budget))
        if method in fail:
            raise RuntimeError(f"{method} broke")
        return measure_row(runner, method, budget, repeats)

    monkeypatch.setattr(bench, "measure", measure)
    return calls


def test_a_failing_row_is_recorded_and_the_run_goes_on_then_exits_nonzero(tmp_path, monkeypatch):
    stem = tmp_path / "bench"
    calls = counting_measure(monkeypatch, fail={"random"})
    with pytest.raises(SystemExit, match=r"(?s)2 benchmark row\(s\) failed.*random @ 1.0 \(RuntimeError: random broke\)"):
        main(quick_args(stem))
    assert calls == [("none", 1.0), ("random", 1.0), ("random", 0.22), ("pool", 1.0), ("pool", 0.22)]
    result = json.loads(stem.with_suffix(".json").read_text())
    assert [(r["method"], r["budget"]) for r in result["rows"]] == [("none", 1.0), ("pool", 1.0), ("pool", 0.22)]
    assert [(e["method"], e["budget"], e["error"]) for e in result["errors"]] == [
        ("random", 1.0, "RuntimeError: random broke"), ("random", 0.22, "RuntimeError: random broke")]
    assert "random @ 0.22: `RuntimeError: random broke`" in stem.with_suffix(".md").read_text()
    assert [r["agreement"] for r in result["rows"] if r["budget"] == 1.0] == [1.0, 1.0]


def test_resume_runs_only_the_rows_not_yet_measured(tmp_path, monkeypatch):
    stem = tmp_path / "bench"
    counting_measure(monkeypatch, interrupt_after=3)
    with pytest.raises(KeyboardInterrupt):
        main(quick_args(stem))
    lines = [json.loads(line) for line in stem.with_suffix(".rows.jsonl").read_text().splitlines()]
    assert [(r["method"], r["budget"]) for r in lines[1:]] == [("none", 1.0), ("random", 1.0), ("random", 0.22)]
    assert not stem.with_suffix(".json").exists()

    calls = counting_measure(monkeypatch, fail={"pool"})
    with pytest.raises(SystemExit):
        main(quick_args(stem, "--resume"))
    assert calls == [("pool", 1.0), ("pool", 0.22)]  # the three finished rows are kept

    calls = counting_measure(monkeypatch)
    main(quick_args(stem, "--resume"))  # only the failed rows run again; exit status 0
    assert calls == [("pool", 1.0), ("pool", 0.22)]
    result = json.loads(stem.with_suffix(".json").read_text())
    assert len(result["rows"]) == 5 and result["errors"] == []


def test_resume_refuses_rows_written_with_other_settings(tmp_path, monkeypatch, capsys):
    stem = tmp_path / "bench"
    counting_measure(monkeypatch, interrupt_after=1)
    with pytest.raises(KeyboardInterrupt):
        main(quick_args(stem))
    with pytest.raises(SystemExit):
        main(quick_args(stem, "--resume", "--max-new-tokens", "3"))
    assert "other settings (max_new_tokens differ): delete it, or drop --resume" in capsys.readouterr().err


def test_built_model_names_resolve_and_the_task_json_prompt_is_the_default(tmp_path, monkeypatch):
    import shutil

    from vlm_compress.bench import run as bench
    from vlm_compress.bench.data import prompt_for, resolve_model
    from vlm_compress.bench.task import ShapesTask
    from vlm_compress.pretrained import tiny_real_llava

    built = tmp_path / "cache" / "tiny-real-llava-0123456789abcdef"  # a built model's directory carries its key
    shutil.copytree(TINY, built)
    prompt = "USER: <image>\nanswer : {question} ASSISTANT:"
    (built / "task.json").write_text(json.dumps({**ShapesTask().describe(), "prompt": prompt}))
    monkeypatch.setattr(tiny_real_llava, "model_path", lambda progress=print: built)
    assert resolve_model("tiny-real-llava") == built and resolve_model("tiny-llava") == TINY
    assert resolve_model(str(tmp_path)) == tmp_path and prompt_for(built) == prompt and prompt_for(TINY) is None

    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    main(["--quick", "--model", "tiny-real-llava", "--methods", "random", "--samples", "6", "--batch-size", "6",
          "--repeats", "1"])
    stem = tmp_path / "results" / "bench_tiny-real-llava_quick"  # the name, not the cache directory's
    settings = json.loads(stem.with_suffix(".rows.jsonl").read_text().splitlines()[0])["settings"]
    assert settings["prompt"] == prompt
    assert [r["method"] for r in json.loads(stem.with_suffix(".json").read_text())["rows"]] == ["none", "random", "random"]
    assert stem.with_suffix(".md").read_text().startswith("# Benchmark: tiny-real-llava on ")
