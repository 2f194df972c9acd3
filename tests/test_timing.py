"""The benchmarks' decode clock: one stamp per generated token, so per-step times are measured, not differenced."""

import pytest
import torch

from vlm_compress.bench.timing import StepClock, decode_ms_per_token, decode_step_ms


def test_step_clock_stamps_once_per_generated_token(model, batch):
    def generate(tokens, logits_processor):
        return model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              logits_processor=logits_processor)

    steps = decode_step_ms(generate, torch.device("cpu"), 5)
    assert len(steps) == 5 and all(s > 0 for s in steps)
    assert decode_ms_per_token(generate, torch.device("cpu"), 3, repeats=2) > 0
    clock = StepClock(torch.device("cpu"))
    scores = torch.randn(2, 7)
    assert clock(torch.zeros(2, 1, dtype=torch.long), scores) is scores and len(clock.stamps) == 1


def test_early_stop_is_a_clear_error(model, batch):
    def stops_early(tokens, logits_processor):  # forgets min_new_tokens: generation may end at EOS; here it is cut
        return model.generate(**batch, max_new_tokens=2, do_sample=False, logits_processor=logits_processor)

    with pytest.raises(RuntimeError, match="min_new_tokens"):
        decode_step_ms(stops_early, torch.device("cpu"), 5)
