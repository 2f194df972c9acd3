"""Budget convention (docs/architecture.md, "The budget convention"): validation and budget → token counts."""

from __future__ import annotations

import math
import numbers


AUTO = "auto"
DEFAULT_MASS = 0.9


def validate_budget(budget: object) -> float | int | str:
    """Return ``budget`` if valid (``"auto"`` / ``"auto:<mass>"`` canonicalised to ``"auto:<mass>"``), else raise a
    ``TypeError``/``ValueError`` that says what to pass."""
    if isinstance(budget, str) and budget.partition(":")[0] == AUTO:
        return f"{AUTO}:{auto_mass(budget):g}"
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"budget must be a float in (0, 1] (share of visual tokens kept), an int >= 1 "
            f"(visual tokens kept per image) or 'auto', got {type(budget).__name__} {budget!r}"
        )
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"an int budget counts visual tokens kept per image and must be >= 1, got {budget}")
        return int(budget)
    budget = float(budget)
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
        hint = " (for an absolute token count pass an int, e.g. budget=64)" if budget > 1 else ""
        raise ValueError(f"a float budget is the share of visual tokens kept and must be in (0, 1], got {budget}{hint}")
    return budget


def is_auto(budget: object) -> bool:
    """Whether ``budget`` asks for per-image counts chosen by the method's scores (``"auto"``, ``"auto:0.8"``)."""
    return isinstance(budget, str)


def auto_mass(budget: str) -> float:
    """The score mass of an ``"auto[:mass]"`` budget (default 0.9); a ``ValueError`` naming the forms otherwise."""
    name, sep, value = budget.partition(":")
    try:
        mass = float(value) if sep else DEFAULT_MASS
    except ValueError:
        mass = math.nan
    if name != AUTO or not 0.0 < mass <= 1.0:
        raise ValueError(f"a string budget must be 'auto' or 'auto:<mass>' with mass in (0, 1] (e.g. 'auto:0.8'), "
                         f"got {budget!r}")
    return mass


def auto_count(scores: "torch.Tensor", mass: float) -> int:
    """Tokens ``budget="auto"`` keeps of one image: the fewest top-scoring tokens whose share of the image's total
    score reaches ``mass``, at least 1.

    ``scores``: ``[N]``, ``-inf`` for tokens a method never picks (newlines), which are not counted. Non-negative
    scores (attention probabilities) are shares as they are; a score vector with negative entries (logits) is
    turned into shares by a softmax over the image's finite scores. Shares within 1e-6 of ``mass`` reach it (float32 sums).
    """
    import torch

    finite = scores[torch.isfinite(scores)].double()
    if finite.numel() == 0:
        return 1
    weights = finite.softmax(0) if bool((finite < 0).any()) else finite
    total = weights.sum()
    if total <= 0:  # no signal: keep everything the method could pick
        return int(finite.numel())
    share = weights.sort(descending=True).values.cumsum(0) / total
    return max(1, min(int(finite.numel()), int((share < mass - 1e-6).sum()) + 1))


def tokens_to_keep(budget: float | int, num_tokens: int) -> int:
    """Visual tokens to keep out of ``num_tokens``.

    Float: ``round(budget * num_tokens)`` (halves round up), at least 1. Int: the int itself. Both are capped at
    ``num_tokens``, so an int larger than the image's token count keeps everything.
    """
    if num_tokens <= 0:
        return 0
    if isinstance(budget, float):
        count = math.floor(budget * num_tokens + 0.5)
    else:
        count = int(budget)
    return max(1, min(num_tokens, count))


def apportion(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split ``total`` tokens over partitions in proportion to ``weights``, at most ``caps[j]`` each.

    Largest-remainder rounding (floors first, then one more token to the largest fractional parts, lower index
    first on ties), with what a capped partition cannot take passed on to the others in proportion, so the result
    always sums to ``min(total, sum(caps))``. Zero total weight splits in proportion to the caps.
    """
    if len(weights) != len(caps):
        raise ValueError(f"{len(weights)} weights for {len(caps)} partitions")
    total = min(int(total), sum(caps))
    out = [0] * len(caps)
    open_ = [j for j in range(len(caps)) if caps[j] > 0]
    while total > sum(out) and open_:
        left = total - sum(out)
        w = [max(float(weights[j]), 0.0) for j in open_]
        if sum(w) <= 0:
            w = [float(caps[j] - out[j]) for j in open_]
        shares = [left * x / sum(w) for x in w]
        grant = [math.floor(s) for s in shares]
        by_remainder = sorted(range(len(open_)), key=lambda i: (-(shares[i] - grant[i]), open_[i]))
        for i in by_remainder[: left - sum(grant)]:
            grant[i] += 1
        for i, j in enumerate(open_):
            out[j] = min(caps[j], out[j] + grant[i])
        open_ = [j for j in open_ if out[j] < caps[j]]
    return out


def ratio_budget_count(budget: float | int, visual: "torch.Tensor", images: "torch.Tensor", dense_layers: int,
                       num_layers: int) -> "torch.Tensor":
    """[B] visual tokens kept from layer ``dense_layers`` on, so the layer-averaged count meets ``budget``.

    With ``N`` visual tokens seen by the first ``K = dense_layers`` of ``L`` layers and ``n`` by the rest, the
    layer average is ``(K·N + (L−K)·n)/L``. Float β: ``n = round(N·(β·L − K)/(L − K))``. Int M (per image,
    ``I`` images): ``n = round((M·I·L − K·N)/(L − K))``. Clamped to ``[0, N]``; halves round up.
    """
    import torch

    visual = visual.to(torch.float64)
    if isinstance(budget, float):
        target = visual * budget * num_layers
    else:
        target = images.to(torch.float64) * budget * num_layers
    kept = torch.floor((target - dense_layers * visual) / (num_layers - dense_layers) + 0.5 + 1e-9)
    return torch.minimum(kept.clamp(min=0), visual).long()


def visual_share(budget: float | int, visual: "torch.Tensor", images: "torch.Tensor") -> "torch.Tensor":
    """[B] float64: the budget as a share of each sample's ``visual`` tokens (``images`` per sample).

    Float: the budget itself. Int M (tokens per image): ``M·images / visual``, capped at 1.
    """
    import torch

    visual = visual.to(torch.float64)
    if isinstance(budget, float):
        return torch.full_like(visual, budget)
    return (budget * images.to(torch.float64) / visual.clamp(min=1)).clamp(max=1.0)
