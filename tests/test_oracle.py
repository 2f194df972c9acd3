"""The bench's oracle row (vlm_compress/bench/oracle.py): which objects a question names, which tokens show them,
and a bench run with the oracle and budget="auto" rows."""

import json

import torch

from vlm_compress.adapters.base import TokenLayout
from vlm_compress.bench.data import ASSETS, shapes_items
from vlm_compress.bench.oracle import asked_objects, object_boxes, tokens_showing
from vlm_compress.bench.run import main
from vlm_compress.bench.task import SceneObject

SCENE = [SceneObject("circle", "red", 5, 0, 0), SceneObject("square", "blue", 7, 5, 9),
         SceneObject("circle", "green", 5, 10, 2), SceneObject("triangle", "red", 5, 8, 10)]


def test_asked_objects_by_shape_colour_and_quadrant():
    grid = (12, 12)
    assert asked_objects("what color is the circle ?", SCENE, grid) == [SCENE[0], SCENE[2]]
    assert asked_objects("what shape is the blue object ?", SCENE, grid) == [SCENE[1]]
    # presence names a colour and a shape: every object that could be it, the distractors of a "no" included
    assert asked_objects("is there a red square ?", SCENE, grid) == [SCENE[0], SCENE[1], SCENE[3]]
    assert asked_objects("what color is the object at the bottom right ?", SCENE, grid) == [SCENE[3]]
    assert asked_objects("is the circle left of the triangle ?", SCENE, grid) == [SCENE[0], SCENE[2], SCENE[3]]
    assert asked_objects("what is this ?", SCENE, grid) == []


def test_tokens_showing_a_cell_on_the_patch_grid_and_a_finer_grid():
    boxes = object_boxes([SCENE[1]], (12, 12))  # cell (5, 9)
    same = TokenLayout.single_grid((12, 12))
    assert tokens_showing(same, boxes).nonzero().flatten().tolist() == [5 * 12 + 9]
    fine = TokenLayout.single_grid((24, 24))  # two tokens per cell side: the 2×2 block under the cell
    assert tokens_showing(fine, boxes).nonzero().flatten().tolist() == [10 * 24 + 18, 10 * 24 + 19, 11 * 24 + 18,
                                                                         11 * 24 + 19]
    with_cls = TokenLayout.single_grid((12, 12), prefix=1)  # CLS is outside every grid
    assert tokens_showing(with_cls, boxes).nonzero().flatten().tolist() == [1 + 5 * 12 + 9]


def test_bench_oracle_and_auto_rows(tmp_path):
    stem = tmp_path / "oracle"
    main(["--model", str(ASSETS / "tiny-llava"), "--methods", "oracle", "cls_attn", "random", "--budgets", "1.0",
          "0.11", "--samples", "12", "--batch-size", "6", "--repeats", "1", "--out", str(stem)])
    result = json.loads(stem.with_suffix(".json").read_text())
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {("none", 1.0), ("oracle", 1.0), ("oracle", 0.11), ("cls_attn", 1.0), ("cls_attn", 0.11),
                         ("cls_attn", "auto"), ("random", 1.0), ("random", 0.11)}  # random has no scores: no auto
    assert rows[("oracle", 1.0)]["agreement"] == 1.0 and rows[("oracle", 0.11)]["llm_visual_tokens"] == 16
    auto = rows[("cls_attn", "auto")]
    assert 1 <= auto["llm_visual_tokens"] < 144 and auto["layer_avg_visual_tokens"] == auto["llm_visual_tokens"]
    assert stem.with_name("oracle_frontier.png").exists() and "| cls_attn | auto |" in stem.with_suffix(".md").read_text()


def test_oracle_keeps_every_asked_object_token(tmp_path):
    """At 16 tokens every question's objects fit (ShapesVQA scenes hold at most 6), so all of them are kept."""
    from vlm_compress import compress, restore
    from vlm_compress.bench.oracle import OraclePruner
    from vlm_compress.bench.run import load_model

    model, processor = load_model(ASSETS / "tiny-llava", torch.device("cpu"), torch.float32)
    compress(model, method=OraclePruner(budget=16))
    oracle, named = model.compression.configs[0], 0
    for item in shapes_items(8):
        boxes = object_boxes(asked_objects(item.question, item.objects, item.grid), item.grid)
        oracle.boxes = [boxes]
        model(**processor(images=[item.image], text=[f"USER: <image>\n{item.question} ASSISTANT:"], return_tensors="pt"))
        kept = model.compression.last.selection.kept_index[0]
        wanted = tokens_showing(TokenLayout.single_grid((12, 12)), boxes).nonzero().flatten()
        assert torch.isin(wanted, kept).all() and kept.numel() == 16
        named += wanted.numel() > 0  # "how many squares" with none names no object
    restore(model)
    assert named >= 6
