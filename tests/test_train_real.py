"""The alignment objective of tiny-real-llava's training (bench/train_real.py) on hand-built inputs."""

import torch
from torch import nn

from vlm_compress.bench.task import SceneObject
from vlm_compress.bench.train_real import ALIGN_WORDS, WordTargets, patch_words


class Sample:
    def __init__(self, objects):
        self.objects = objects


def test_patch_words_mark_each_objects_cell_and_leave_the_rest_empty():
    objects = [SceneObject("circle", "red", 7, 0, 0), SceneObject("triangle", "blue", 7, 2, 11)]
    words = patch_words([Sample(objects), Sample([])])
    empty = ALIGN_WORDS.index("empty")
    assert words.shape == (2, 144, 2)
    assert words[0, 0].tolist() == [ALIGN_WORDS.index("red"), ALIGN_WORDS.index("circle")]
    assert words[0, 2 * 12 + 11].tolist() == [ALIGN_WORDS.index("blue"), ALIGN_WORDS.index("triangle")]
    assert int((words[0, :, 0] != empty).sum()) == 2 and bool((words[1] == empty).all())


class Tokenizer:
    """Word ``i`` of ALIGN_WORDS → tokens ``[i]``, except ``triangle`` → two tokens."""

    def __call__(self, word, add_special_tokens=False):
        index = ALIGN_WORDS.index(word)
        return {"input_ids": [index, len(ALIGN_WORDS)] if word == "triangle" else [index]}


def test_word_targets_average_token_embeddings_and_score_relative_squared_error():
    embedding = nn.Embedding(len(ALIGN_WORDS) + 1, 4)
    with torch.no_grad():
        embedding.weight.copy_(torch.arange(embedding.weight.numel(), dtype=torch.float).view_as(embedding.weight) + 1)
    model = type("M", (), {"get_input_embeddings": lambda self: embedding})()
    targets = WordTargets(model, Tokenizer())
    weight = embedding.weight.detach()
    triangle = ALIGN_WORDS.index("triangle")
    torch.testing.assert_close(targets.table[triangle], (weight[triangle] + weight[-1]) / 2)

    red, circle, empty = (ALIGN_WORDS.index(w) for w in ("red", "circle", "empty"))
    words = torch.tensor([[[red, circle], [empty, empty], [empty, empty]]])  # [1, 3, 2]
    exact = torch.stack([(targets.table[red] + targets.table[circle]) / 2, targets.table[empty], targets.table[empty]])
    assert float(targets.loss(exact[None], words)) == 0.0
    assert abs(float(targets.loss(torch.zeros(1, 3, 4), words)) - 2.0) < 1e-6  # each mean is 1 at a zero output
    doubled = exact.clone()
    doubled[1] *= 2  # one empty patch off by its own norm: its error 1, the empty mean 0.5
    assert abs(float(targets.loss(doubled[None], words)) - 0.5) < 1e-6


def test_learning_rate_warms_up_from_the_optimisers_start_and_decays_along_a_cosine_over_the_run():
    from types import SimpleNamespace

    from vlm_compress.bench.train_real import learning_rate_factor

    flat = SimpleNamespace(warmup=10, cosine=False, steps=0)
    assert learning_rate_factor(0, 0, 0, flat) == 0.1 and learning_rate_factor(9, 0, 0, flat) == 1.0
    assert learning_rate_factor(504, 500, 500, flat) == 0.5  # a new optimiser warms up again
    assert learning_rate_factor(504, 500, 0, flat) == 1.0  # a resumed one does not
    cosine = SimpleNamespace(warmup=1, cosine=True, steps=100)
    assert learning_rate_factor(500, 500, 0, cosine) == 1.0
    assert abs(learning_rate_factor(550, 500, 0, cosine) - 0.55) < 1e-12  # halfway: (1 + 0.1) / 2
    assert abs(learning_rate_factor(600, 500, 0, cosine) - 0.1) < 1e-12
    assert abs(learning_rate_factor(700, 500, 0, cosine) - 0.1) < 1e-12  # past the horizon it stays at a tenth
