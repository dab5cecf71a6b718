"""The `confidence` unmasking strategy: every position committed, schedules respected, duplicates deferred."""

import pytest
import torch

from whisfusion_cli.decoding import DecodingOptions, parallel_diffusion_decode
from whisfusion_cli.model import ModelConfig, WhisperDiffusionDecoder, init_weights


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    cfg = ModelConfig(family="whisper", n_layer=2, n_head=2, n_embd=32, intermediate_size=64, vocab_size=300,
                      block_size=64, output_vocab_size=260)
    dec = WhisperDiffusionDecoder(cfg)
    init_weights(dec, std=0.3)  # a peaky random model: confident, repetitive predictions
    return dec.eval()


@pytest.mark.parametrize("steps", [1, 3, 8, 40])
@pytest.mark.parametrize("extra", [{}, {"repeat_penalty": 0.5}, {"blocks": 3}, {"candidates": 3, "temperature": 1.0}])
def test_every_position_is_committed(decoder, steps, extra):
    cond = torch.randn(1, 20, 32)
    opts = DecodingOptions(strategy="confidence", steps=steps, seq_len=24, candidates=extra.get("candidates", 1),
                           seed=0, **{k: v for k, v in extra.items() if k != "candidates"})
    out = parallel_diffusion_decode(decoder, cond, seq_len=24, prefix_ids=[258, 259], pad_id=256, options=opts)
    assert (out.tokens != decoder.config.mask_token_id).all()
    assert (out.tokens[:, :2] == torch.tensor([258, 259])).all()
    assert (out.tokens[:, 2:] < 260).all()  # only text tokens + end-of-text are predicted
    assert ((out.confidences[:, 2:] > 0) & (out.confidences[:, 2:] <= 1)).all()


def test_same_step_adjacent_duplicates_are_deferred(decoder):
    """With one step nothing can be deferred; with more steps and the rule on, adjacent repeats committed in
    the same step are re-decided later: the rule changes the result on this repetitive random model."""
    cond = torch.randn(1, 20, 32)
    base = DecodingOptions(strategy="confidence", steps=4, seq_len=32, candidates=1, seed=0)
    plain = parallel_diffusion_decode(decoder, cond, seq_len=32, prefix_ids=[258, 259], pad_id=256, options=base)
    rows = plain.tokens[0, 2:]
    assert (rows[1:] == rows[:-1]).any(), "fixture model should repeat tokens"
    ruled = parallel_diffusion_decode(decoder, cond, seq_len=32, prefix_ids=[258, 259], pad_id=256,
                                      options=DecodingOptions(**{**base.to_dict(), "schedule": base.schedule,
                                                                 "repeat_penalty": 0.5}))
    assert (ruled.tokens != decoder.config.mask_token_id).all()
    assert not torch.equal(ruled.tokens, plain.tokens)
