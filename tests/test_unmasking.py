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


def test_refine_pass_repredicts_the_least_confident_and_the_duplicates(decoder):
    """One mask-predict pass: the lowest-confidence share of the transcript and every token equal to its left
    neighbour are re-masked and predicted again from the rest; nothing else changes."""
    from whisfusion_cli.decoding import _refine_pass

    torch.manual_seed(3)
    P, L, pad = 2, 20, 256
    canvas = torch.randint(0, 200, (1, L))
    canvas[0, :P] = torch.tensor([258, 259])
    canvas[0, 14:] = pad  # 12 transcript tokens, then end-of-text
    canvas[0, 6] = canvas[0, 5]  # a duplicate
    confidences = torch.rand(1, L) * 0.5 + 0.5
    confidences[0, :P] = 1.0
    confidences[0, 9], confidences[0, 11], confidences[0, 3] = 0.01, 0.02, 0.03  # the three least sure
    opts = DecodingOptions(strategy="confidence", refine=2, refine_fraction=0.25, seq_len=L, candidates=1)
    cond = torch.randn(1, 20, 32)
    kv = decoder.precompute_cross_kv(cond)
    out, conf = _refine_pass(decoder, canvas, confidences, P, kv, opts, None, pad, r=0)
    masked = torch.zeros(L, dtype=torch.bool)
    masked[[3, 9, 11, 6]] = True  # ceil(12 x 0.25) = 3 least confident + the duplicate
    x = torch.where(masked, torch.tensor(decoder.config.mask_token_id), canvas[0])
    probs = torch.softmax(decoder(x[None], cross_kv=kv)[0].float(), -1)
    assert torch.equal(out[0, ~masked], canvas[0, ~masked]) and torch.equal(conf[0, ~masked], confidences[0, ~masked])
    assert torch.equal(out[0, masked], probs[masked].argmax(-1))
    torch.testing.assert_close(conf[0, masked], probs[masked].max(-1).values)
    # The second (last) pass re-masks half as many: ceil(12 x 0.125) = 2.
    opts_last = DecodingOptions(strategy="confidence", refine=2, refine_fraction=0.25, seq_len=L, candidates=1)
    out2, _ = _refine_pass(decoder, canvas, confidences, P, kv, opts_last, None, pad, r=1)
    changed_allowed = torch.zeros(L, dtype=torch.bool)
    changed_allowed[[9, 11, 6]] = True  # the two least sure + the duplicate
    assert torch.equal(out2[0, ~changed_allowed], canvas[0, ~changed_allowed])


def test_refine_pass_remasks_the_second_copy_of_a_repeated_pair(decoder):
    """ "can do can do": a pair equal to the pair before it is the two-token form of a parallel duplicate."""
    from whisfusion_cli.decoding import _refine_pass

    P, pad = 2, 256
    canvas = torch.tensor([[258, 259, 10, 11, 20, 21, 20, 21, 30, 31, pad, pad, pad, pad]])
    L = canvas.size(1)
    confidences = torch.full((1, L), 0.9)
    confidences[0, 2] = 0.1  # the least sure: ceil(8 x 0.1) = 1 token
    opts = DecodingOptions(strategy="confidence", refine=1, refine_fraction=0.1, seq_len=L, candidates=1)
    kv = decoder.precompute_cross_kv(torch.randn(1, 20, 32))
    out, conf = _refine_pass(decoder, canvas, confidences, P, kv, opts, None, pad, r=0)
    masked = torch.zeros(L, dtype=torch.bool)
    masked[[2, 6, 7]] = True  # the least confident and the second "20 21"
    x = torch.where(masked, torch.tensor(decoder.config.mask_token_id), canvas[0])
    probs = torch.softmax(decoder(x[None], cross_kv=kv)[0].float(), -1)
    assert torch.equal(out[0, ~masked], canvas[0, ~masked]) and torch.equal(conf[0, ~masked], confidences[0, ~masked])
    assert torch.equal(out[0, masked], probs[masked].argmax(-1))
