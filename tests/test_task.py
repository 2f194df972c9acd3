"""ShapesVQA: determinism, disjoint splits, balanced answers, and answers that follow from the scene."""

import collections
import dataclasses

import numpy as np
import pytest

from vlm_compress.bench.task import COLORS, QUESTION_TYPES, SHAPES, ShapesTask, vocabulary

TASK = ShapesTask()


@pytest.fixture(scope="module")
def samples():
    return list(TASK.iterate("train", 600))


def test_deterministic_by_split_and_index():
    a, b = TASK.sample_at("test", 17), TASK.sample_at("test", 17)
    assert np.array_equal(a.image, b.image) and (a.question, a.answer) == (b.question, b.answer)
    assert not np.array_equal(TASK.sample_at("train", 17).image, a.image)
    with pytest.raises(ValueError, match="split"):
        TASK.sample_at("dev", 0)


def test_splits_do_not_share_scenes():
    train = {TASK.sample_at("train", i).image.tobytes() for i in range(200)}
    assert not any(TASK.sample_at("test", i).image.tobytes() in train for i in range(200))


def test_question_types_and_answers_are_balanced(samples):
    types = collections.Counter(s.qtype for s in samples)
    assert set(types) == set(QUESTION_TYPES)
    assert all(60 <= n <= 140 for n in types.values()), types  # uniform: 100 each
    colours = collections.Counter(s.answer for s in samples if s.qtype in ("color_of_shape", "region"))
    assert set(colours) == set(COLORS) and max(colours.values()) < 2.2 * min(colours.values())
    for qtype, answers in (("presence", ("yes", "no")), ("relative", ("yes", "no"))):
        counts = collections.Counter(s.answer for s in samples if s.qtype == qtype)
        assert set(counts) == set(answers) and min(counts.values()) > 0.3 * sum(counts.values())
    counts = collections.Counter(s.answer for s in samples if s.qtype == "count")
    assert set(counts) == {"0", "1", "2", "3"}


def _expected_answer(s, task):
    objs = s.objects
    words = s.question.split()
    if s.qtype == "color_of_shape":
        [o] = [o for o in objs if o.shape == words[4]]
        return o.color
    if s.qtype == "shape_of_color":
        [o] = [o for o in objs if o.color == words[4]]
        return o.shape
    if s.qtype == "presence":
        return "yes" if any((o.color, o.shape) == (words[3], words[4]) for o in objs) else "no"
    if s.qtype == "count":
        return str(sum(o.shape == words[2] for o in objs))
    if s.qtype == "region":
        vertical, horizontal = words[7], words[8]
        inside = [o for o in objs
                  if (o.row < task.rows / 2) == (vertical == "top") and (o.col < task.cols / 2) == (horizontal == "left")]
        [o] = inside
        return o.color
    if s.qtype == "relative":
        [a] = [o for o in objs if o.shape == words[2]]
        [b] = [o for o in objs if o.shape == words[6]]
        assert abs(a.col - b.col) >= 2
        return "yes" if a.col < b.col else "no"
    raise AssertionError(s.qtype)


def test_answers_follow_from_the_scene(samples):
    for s in samples:
        assert s.answer == _expected_answer(s, TASK), (s.question, s.objects)


def test_objects_sit_in_separate_cells_and_are_drawn(samples):
    for s in samples[:100]:
        cells = [(o.row, o.col) for o in s.objects]
        for i, (r, c) in enumerate(cells):
            assert all(max(abs(r - r2), abs(c - c2)) >= 2 for r2, c2 in cells[i + 1:])
            block = s.image[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].astype(int)
            target = np.array(COLORS[s.objects[i].color])
            assert (np.abs(block - target).sum(-1) < 60).sum() >= 8  # the object's colour fills part of its cell


def test_vocabulary_covers_prompts_and_answers(samples):
    vocab = set(vocabulary())
    for s in samples:
        assert set(s.prompt.replace("<image>", "").split()) <= vocab and s.answer in vocab
    assert set(SHAPES) <= vocab


def test_other_canvas_sizes():
    task = ShapesTask(canvas=(96, 192), cell=8)
    s = task.sample_at("test", 3)
    assert s.image.shape == (96, 192, 3) and max(o.col for o in s.objects) < 24


def test_further_questions_about_a_scene_are_answered_by_it(samples):
    rng = np.random.default_rng(0)
    seen = collections.Counter()
    for s in samples[:200]:
        for question, answer, qtype in TASK.questions_about(s.objects, rng, 4):
            extra = dataclasses.replace(s, question=question, answer=answer, qtype=qtype)
            assert answer == _expected_answer(extra, TASK), (question, s.objects)
            seen[qtype] += 1
    assert set(seen) == set(QUESTION_TYPES)


def test_question_type_subset_and_description_round_trip():
    task = ShapesTask(canvas=192, cell=8, objects=(4, 10), question_types=("count", "presence"))
    assert {task.sample_at("train", i).qtype for i in range(40)} == {"count", "presence"}
    s = task.sample_at("train", 0)
    assert {t for *_, t in task.questions_about(s.objects, np.random.default_rng(0), 20)} <= {"count", "presence"}
    again = ShapesTask.from_description(task.describe())
    assert np.array_equal(again.sample_at("test", 5).image, task.sample_at("test", 5).image)
    with pytest.raises(ValueError, match="question_types"):
        ShapesTask(question_types=("colour",))


def test_unrendered_samples_have_the_same_question_and_answer():
    for i in range(20):
        drawn, bare = TASK.sample_at("test", i), TASK.sample_at("test", i, render=False)
        assert bare.image is None and (bare.question, bare.answer, bare.objects) == (drawn.question, drawn.answer, drawn.objects)
