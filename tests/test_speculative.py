"""Speculative decoding: the standard rule is lossless (exact enumeration of single steps and of the whole decoding
loop, Monte Carlo on the real models), LANTERN's invariants, greedy equality, cache rollback, warps and errors."""

import itertools
import math
import zlib
from collections import defaultdict

import pytest
import torch

from vlm_compress.speculative import (
    AcceptanceRule,
    GenerationStats,
    ImageGPT,
    ImageGPTConfig,
    LanternRule,
    ModelStream,
    Warp,
    generate,
    latent_neighbors,
    load_generator,
    speculative_generate,
)

STANDARD = AcceptanceRule()


def dist(*values):
    t = torch.tensor(values, dtype=torch.float64)
    return t / t.sum()


def one_step_law(rule, p, q, draft="sample"):
    """The exact law of one verified position: Σ_x q(x)·[a(x)·δ_x + (1 − a(x))·r_x] (argmax drafts: x = argmax q)."""
    law = torch.zeros_like(p)
    drafts = [(int(q.argmax()), 1.0)] if draft == "argmax" else [(x, float(q[x])) for x in range(len(q)) if q[x] > 0]
    for x, weight in drafts:
        proposal = q if draft == "sample" else torch.nn.functional.one_hot(torch.tensor(x), len(q)).double()
        accept, residual = rule.decide(p, proposal, x)
        law[x] += weight * accept
        law += weight * (1 - accept) * residual
    return law


EDGE_CASES = {
    "random": (dist(3, 1, 4, 1, 5, 9, 2, 6), dist(2, 7, 1, 8, 2, 8, 1, 8)),
    "q zero where p positive": (dist(1, 2, 3, 4), dist(0, 5, 0, 5)),
    "p zero where q positive": (dist(0, 1, 0, 3), dist(2, 1, 1, 1)),
    "p equals q": (dist(1, 2, 3, 4), dist(1, 2, 3, 4)),
    "disjoint supports": (dist(1, 1, 0, 0), dist(0, 0, 1, 3)),
    "one-hot p": (dist(0, 0, 1, 0), dist(1, 1, 1, 1)),
    "near-uniform p": (dist(*([1.0] * 9 + [1.001])), dist(*range(1, 11))),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("draft", ["sample", "argmax"])
def test_one_step_output_law_is_the_target(case, draft):
    p, q = EDGE_CASES[case]
    assert torch.allclose(one_step_law(STANDARD, p, q, draft), p, atol=1e-12)


def test_acceptance_rate_is_one_minus_total_variation():
    for p, q in EDGE_CASES.values():
        rate = sum(float(q[x]) * STANDARD.decide(p, q, x)[0] for x in range(len(q)) if q[x] > 0)
        assert math.isclose(rate, 1 - 0.5 * float((p - q).abs().sum()), abs_tol=1e-12)
    p, q = EDGE_CASES["disjoint supports"]
    assert all(STANDARD.decide(p, q, x)[0] == 0 for x in (2, 3))
    p, q = EDGE_CASES["p equals q"]
    assert all(STANDARD.decide(p, q, x)[0] == 1 for x in range(4))


# ---- the whole decoding loop, enumerated ------------------------------------------------------------------
class ReplaySampler:
    """Takes the choices in ``prefix``, then the first option of every new choice point, recording each point's
    options so that the caller can enumerate every branch with its probability."""

    def __init__(self, prefix):
        self.prefix, self.taken, self.options, self.prob = list(prefix), [], [], 1.0

    def _choose(self, options):
        options = [(v, w) for v, w in options if w > 0]
        value = self.prefix[len(self.taken)] if len(self.taken) < len(self.prefix) else options[0][0]
        self.prob *= dict(options)[value]
        self.taken.append(value)
        self.options.append(options)
        return value

    def categorical(self, probs):
        return torch.tensor(self._choose([(i, float(w)) for i, w in enumerate(probs.reshape(-1))]))

    def bernoulli(self, prob):
        return self._choose([(True, prob), (False, 1 - prob)])


def enumerate_law(run):
    """The exact law of ``run(sampler) -> tuple`` over every branch of its random choices."""
    law, stack = defaultdict(float), [[]]
    while stack:
        prefix = stack.pop()
        sampler = ReplaySampler(prefix)
        law[run(sampler)] += sampler.prob
        for depth in range(len(prefix), len(sampler.taken)):
            stack += [sampler.taken[:depth] + [v] for v, _ in sampler.options[depth] if v != sampler.taken[depth]]
    return dict(law)


class TableStream:
    """A lookup-table model: each whole prefix (class, codes…) has its own next-code distribution, so any cache
    misalignment changes the law."""

    def __init__(self, vocab, seed):
        self.vocab, self.seed, self.tables = vocab, seed, {}
        self.prefix = []

    def probs(self, prefix):
        key = tuple(prefix)
        if key not in self.tables:
            g = torch.Generator().manual_seed(zlib.crc32(repr((self.seed, key)).encode()))  # not hash(): salted
            weights = torch.rand(self.vocab, generator=g, dtype=torch.float64) ** 3 + 1e-3
            self.tables[key] = weights / weights.sum()
        return self.tables[key]

    @property
    def length(self):
        return len(self.prefix) - 1

    def start(self, classes):
        self.prefix = [("class", int(classes[0]))]
        return self.probs(self.prefix).log()[None]

    def extend(self, codes):
        out = []
        for c in codes.reshape(-1).tolist():
            self.prefix.append(c)
            out.append(self.probs(self.prefix).log())
        return torch.stack(out)[None]

    def crop(self, length):
        assert 0 <= length <= self.length
        self.prefix = self.prefix[:length + 1]


def exact_target_law(stream, length, warp=Warp()):
    law = {}
    for seq in itertools.product(range(stream.vocab), repeat=length):
        prob, prefix = 1.0, [("class", 0)]
        for c in seq:
            prob *= float(warp(stream.probs(prefix).log())[c])
            prefix.append(c)
        law[seq] = prob
    return law


def total_variation(a, b):
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


@pytest.mark.parametrize("gamma,draft,warp", [
    (2, "sample", Warp()),
    (3, "sample", Warp(temperature=0.7, top_k=2)),
    (2, "argmax", Warp()),
    (1, "sample", Warp(top_p=0.8)),
])
def test_speculative_loop_law_equals_the_target_by_exact_enumeration(gamma, draft, warp):
    target, drafter = TableStream(3, seed=1), TableStream(3, seed=2)

    def run(sampler):
        codes, _ = speculative_generate(target, drafter, [0], gamma=gamma, num_codes=3, warp=warp, draft=draft,
                                        sampler=sampler)
        return tuple(codes[0].tolist())

    law = enumerate_law(run)
    assert math.isclose(sum(law.values()), 1.0, abs_tol=1e-9)
    assert total_variation(law, exact_target_law(target, 3, warp)) < 1e-9


def test_lantern_at_delta_zero_is_the_standard_loop_branch_for_branch():
    target, drafter = TableStream(3, seed=3), TableStream(3, seed=4)
    neighbors = latent_neighbors(torch.tensor([[0.0], [1.0], [3.0]]), k=2)

    def run(rule):
        return lambda sampler: tuple(speculative_generate(target, drafter, [0], gamma=2, num_codes=3, rule=rule,
                                                          sampler=sampler)[0][0].tolist())

    assert enumerate_law(run(LanternRule(neighbors, delta=0.0))) == enumerate_law(run(STANDARD))
    assert enumerate_law(run(LanternRule(neighbors, lam=1.0))) == enumerate_law(run(STANDARD))
    relaxed = enumerate_law(run(LanternRule(neighbors, delta=0.3)))
    assert total_variation(relaxed, exact_target_law(target, 3)) > 1e-3  # the relaxation does change the law


# ---- LANTERN --------------------------------------------------------------------------------------------
def test_latent_neighbors_exclude_the_code_and_are_nearest_first():
    codebook = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    near = latent_neighbors(codebook, k=3)
    assert near.tolist() == [[1, 2, 3], [0, 2, 3], [3, 1, 0], [2, 1, 0]]
    with pytest.raises(ValueError, match="k must lie"):
        latent_neighbors(codebook, k=4)


@pytest.mark.parametrize("delta", [0.0, 0.05, 0.1, 0.2, 0.4])
def test_lantern_proximity_sets_and_relaxed_targets_keep_their_bounds(delta):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(12, 3, generator=g)
    neighbors = latent_neighbors(codebook, k=5)
    rule = LanternRule(neighbors, delta=delta)
    for trial in range(20):
        p = torch.rand(12, generator=g, dtype=torch.float64) ** 4
        p /= p.sum()
        for x in range(12):
            near = rule.proximity_set(p, x)
            assert near.tolist() == neighbors[x, :len(near)].tolist()  # a prefix of N_k(x), so within the k-th
            assert x not in near.tolist()
            assert float(p[near].sum()) <= delta + 1e-12
            if len(near) < 5:  # the longest such prefix
                assert float(p[neighbors[x, :len(near) + 1]].sum()) > delta
            pi = rule.target(p, x)
            assert math.isclose(float(pi.sum()), 1.0, abs_tol=1e-12)
            assert math.isclose(0.5 * float((pi - p).abs().sum()), float(p[near].sum()), abs_tol=1e-12)
    if delta == 0:
        p = dist(*range(1, 13))
        assert all(torch.equal(rule.target(p, x), p) for x in range(12))


def test_lantern_plus_plus_bounds_the_relaxed_mass_by_lambda():
    g = torch.Generator().manual_seed(1)
    neighbors = latent_neighbors(torch.randn(10, 2, generator=g), k=9)
    for lam in (1.0, 1.5, 3.0):
        rule = LanternRule(neighbors, lam=lam)
        for _ in range(10):
            p = torch.rand(10, generator=g, dtype=torch.float64)
            p /= p.sum()
            for x in range(10):
                assert float(rule.target(p, x)[x]) <= lam * float(p[x]) + 1e-12


def test_lantern_acceptance_never_falls_as_delta_or_k_grow():
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(16, 4, generator=g)
    for _ in range(10):
        p, q = (torch.rand(16, generator=g, dtype=torch.float64) for _ in range(2))
        p, q = p / p.sum(), q / q.sum()
        for x in range(16):
            by_delta = [LanternRule(latent_neighbors(codebook, 6), delta=d).decide(p, q, x)[0]
                        for d in (0, 0.05, 0.1, 0.2, 0.5)]
            by_k = [LanternRule(latent_neighbors(codebook, k), delta=0.1).decide(p, q, x)[0] for k in (1, 2, 4, 8, 15)]
            assert by_delta == sorted(by_delta) and by_k == sorted(by_k)


def test_lantern_output_law_can_exceed_delta_the_reference_example():
    """The per-step bound is on π_x, not on the output law (reference §7.3): V = 3, codes at 0, 1, 3, k = 1."""
    rule = LanternRule(latent_neighbors(torch.tensor([[0.0], [1.0], [3.0]]), k=1), delta=0.1)
    p = torch.tensor([0.098, 0.090, 0.812], dtype=torch.float64)
    q = torch.tensor([0.189, 0.477, 0.334], dtype=torch.float64)
    law = one_step_law(rule, p, q)
    assert torch.allclose(law, torch.tensor([0.188, 0.188, 0.624], dtype=torch.float64), atol=1e-3)
    assert 0.5 * float((law - p).abs().sum()) > 0.1
    assert all(0.5 * float((rule.target(p, x) - p).abs().sum()) <= 0.1 for x in range(3))


def test_lantern_rejects_bad_options():
    near = latent_neighbors(torch.randn(4, 2), k=2)
    for kwargs, match in [({}, "exactly one"), ({"delta": 0.1, "lam": 2.0}, "exactly one"),
                          ({"delta": 1.5}, "delta must"), ({"lam": 0.5}, "lam must")]:
        with pytest.raises(ValueError, match=match):
            LanternRule(near, **kwargs)
    with pytest.raises(ValueError, match="latent_neighbors"):
        LanternRule(near.float(), delta=0.1)


# ---- the real models ----------------------------------------------------------------------------------
def tiny_gpt(seed, scale=25.0, **overrides):
    torch.manual_seed(seed)
    config = dict(codebook_size=6, num_classes=3, grid=2, width=32, depth=2, heads=2, mlp_hidden=64)
    model = ImageGPT(ImageGPTConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # sharper than the N(0, 0.02) initialisation, so positions and context matter
        for p in model.parameters():
            p.mul_(scale)
    return model


def test_cached_decoding_and_rollback_match_a_full_forward():
    model = tiny_gpt(0)
    stream = ModelStream(model)
    stream.start(torch.tensor([1]))
    stream.extend(torch.tensor([[2, 3, 4]]))
    stream.crop(1)  # keep code 2, drop 3 and 4 (a rejected draft)
    rolled = stream.extend(torch.tensor([[5, 0]]))
    full = model(torch.tensor([[6 + 1, 2, 5, 0]]))
    assert torch.allclose(rolled[0], full[0, 2:], atol=1e-5)
    with pytest.raises(ValueError, match="cannot crop"):
        stream.crop(5)


def test_guided_stream_combines_conditional_and_null_logits():
    model = tiny_gpt(1)
    guided = ModelStream(model, cfg_scale=3.0).start(torch.tensor([2]))
    cond, null = model(torch.tensor([[6 + 2]]))[0, -1], model(torch.tensor([[6 + 3]]))[0, -1]
    # logits reach ~500 at this scale: a relative tolerance (float32 sums differ by machine in the last bits)
    torch.testing.assert_close(guided[0], null + 3.0 * (cond - null), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_greedy_speculative_decoding_returns_the_greedy_codes(cfg_scale):
    target, drafter = tiny_gpt(2, codebook_size=16, grid=4), tiny_gpt(3, codebook_size=16, grid=4, depth=1)
    neighbors = latent_neighbors(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), k=4)
    plain, _ = generate(target, [0, 1, 2], greedy=True, cfg_scale=cfg_scale)
    for gamma, rule in [(1, STANDARD), (3, STANDARD), (5, LanternRule(neighbors, delta=0.0))]:
        spec, stats = speculative_generate(target, drafter, [0, 1, 2], gamma=gamma, rule=rule, greedy=True,
                                           cfg_scale=cfg_scale)
        assert torch.equal(spec, plain)
        assert stats.codes == 48 and stats.target_calls < 48 * 3


def test_drafter_equal_to_target_accepts_every_draft():
    target = tiny_gpt(4, codebook_size=16, grid=4)
    g = torch.Generator().manual_seed(0)
    _, greedy = speculative_generate(target, target, [0, 1], gamma=4, greedy=True)
    _, sampled = speculative_generate(target, target, [0, 1], gamma=4, generator=g)
    assert greedy.acceptance_rate == 1.0 and sampled.acceptance_rate > 0.99
    # 16 codes: the class prefix, three rounds of 4 drafts + 1 bonus, and one round for the last code
    assert greedy.accepted_per_round == [4, 4, 4, 0] * 2 and greedy.target_calls == 2 * 5


@torch.no_grad()
def test_monte_carlo_of_the_real_models_matches_the_target_law():
    # scale 3: a spread target (perplexity ≈ 17 over the 64 sequences), where a wrong residual shows (TV ≈ 2.8×
    # the sampling noise when the residual is p itself)
    target, drafter = tiny_gpt(5, 3.0, codebook_size=4), tiny_gpt(6, 3.0, codebook_size=4, depth=1)
    warp = Warp(temperature=0.9)
    exact = {}
    for seq in itertools.product(range(4), repeat=3):
        logits = target(torch.tensor([[4 + 1, *seq[:2]]]))[0]
        exact[seq] = math.prod(float(warp(logits[i])[c]) for i, c in enumerate(seq))
    n, g = 1000, torch.Generator().manual_seed(0)
    counts = defaultdict(int)
    for _ in range(n):
        codes, _ = speculative_generate(target, drafter, [1], gamma=2, num_codes=3, warp=warp, generator=g)
        counts[tuple(codes[0].tolist())] += 1
    tv = total_variation({k: v / n for k, v in counts.items()}, exact)
    # the mean TV of an exact sampler with n draws: 0.5 Σ sqrt(2 p (1 − p) / (π n)); a wrong rule lands far above
    noise = 0.5 * sum(math.sqrt(2 * p * (1 - p) / (math.pi * n)) for p in exact.values())
    assert tv < 2 * noise, (tv, noise)


def test_batch_of_greedy_plain_generation_equals_single_calls():
    model = tiny_gpt(7, codebook_size=16, grid=4)
    batch, _ = generate(model, [0, 2, 1], greedy=True)
    for i, c in enumerate([0, 2, 1]):
        assert torch.equal(generate(model, [c], greedy=True)[0][0], batch[i])


# ---- warps and errors ---------------------------------------------------------------------------------
def test_warp_top_k_top_p_and_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1)
    assert (Warp(top_k=2)(logits) > 0).tolist() == [True, True, False, False]
    probs = logits.softmax(-1)
    keep = Warp(top_p=float(probs[0]) + 1e-3)(logits)
    assert (keep > 0).tolist() == [True, True, False, False]  # the smallest set reaching top_p
    assert (Warp(top_p=float(probs[0]) - 1e-3)(logits) > 0).tolist() == [True, False, False, False]
    assert torch.allclose(Warp(temperature=0.5)(logits), (logits / 0.5).softmax(-1))
    for bad, match in [({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0}, "top_p")]:
        with pytest.raises(ValueError, match=match):
            Warp(**bad)


def test_bad_arguments_raise_clear_errors():
    target = tiny_gpt(8)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, target, [0], gamma=0)
    with pytest.raises(ValueError, match="draft must be"):
        speculative_generate(target, target, [0], draft="tree")
    with pytest.raises(ValueError, match="classes must lie"):
        generate(target, [3])
    with pytest.raises(ValueError, match="share a codebook"):
        speculative_generate(target, tiny_gpt(9, codebook_size=8), [0])
    with pytest.raises(ValueError, match="num_codes"):
        generate(target, [0], num_codes=5)


def test_generator_folder_round_trip_and_damaged_files(tmp_path):
    model = tiny_gpt(10, 3.0, codebook_size=16, grid=4)
    ids = torch.tensor([[16 + 1, 3, 7, 2]])
    model.save_pretrained(tmp_path / "fp32")
    again = load_generator(tmp_path / "fp32")
    assert again.config == model.config and torch.equal(again(ids), model(ids))
    model.save_pretrained(tmp_path / "fp16", dtype=torch.float16)  # the shipped form, loaded back as float32
    half = load_generator(tmp_path / "fp16")
    assert half.output.weight.dtype == torch.float32
    assert not torch.equal(half(ids), model(ids)) and torch.allclose(half(ids), model(ids), rtol=1e-2, atol=1e-2)
    (tmp_path / "fp32" / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file.*save or copy the folder again"):
        load_generator(tmp_path / "fp32")
    with pytest.raises(FileNotFoundError, match="neither a folder nor an embedded generator"):
        load_generator(tmp_path / "missing")


def test_generation_stats_total_sums_the_parts():
    target, drafter = tiny_gpt(11, codebook_size=16, grid=4), tiny_gpt(12, codebook_size=16, grid=4, depth=1)
    g = torch.Generator().manual_seed(0)
    parts = [speculative_generate(target, drafter, [c], gamma=3, generator=g)[1] for c in (0, 1)]
    total = GenerationStats.total(parts)
    assert total.codes == 32 and total.target_calls == sum(p.target_calls for p in parts)
    assert total.accepted_per_round == parts[0].accepted_per_round + parts[1].accepted_per_round
    assert total.mean_accepted_length == 32 / total.target_calls
    assert total.acceptance_rate == sum(p.accepted for p in parts) / sum(p.drafted for p in parts)
