"""The `confidence` unmasking strategy: every position committed, schedules respected, duplicates deferred."""

import json

import pytest
import torch

from whisfusion_cli.decoding import (
    Batch, DecodingOptions, Policy, Refine, Step, _refine_pass, decode_traced, parallel_diffusion_decode,
)
from whisfusion_cli.forward import SharedForward
from whisfusion_cli.model import ModelConfig, WhisperDiffusionDecoder, init_weights
from whisfusion_cli.upstream import Trace


class FillInBlocks(Policy):
    """Semi-autoregressive filling, an experiment that is no option (worse than confidence order, docs/
    EXPERIMENTS.md): the canvas is filled in `n` blocks, left to right; within a block, by confidence. Later
    blocks stay masked (and are still predicted, as context) until their turn."""

    def __init__(self, n: int):
        self.n = n

    def _later(self, step: Step):
        n_blocks = min(self.n, step.steps)  # at least one step per block
        if n_blocks <= 1:
            return None
        block = min(n_blocks - 1, step.index * n_blocks // step.steps)
        end = step.P + (step.n_gen * (block + 1) + n_blocks - 1) // n_blocks
        return torch.arange(step.canvas.size(1), device=end.device) >= end[:, None]

    def rescore(self, step: Step) -> None:
        later = self._later(step)
        if later is not None:
            step.scores = step.scores.masked_fill(later, -2.0)

    def commit(self, step: Step) -> None:
        later = self._later(step)
        if later is not None:
            step.commit &= ~later


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
                           seed=0, **{k: v for k, v in extra.items() if k not in ("candidates", "blocks")})
    trace = Trace(policies=[FillInBlocks(extra["blocks"])] if "blocks" in extra else [])
    out = decode_traced(decoder, cond, opts, trace, prefix_ids=[258, 259], pad_id=256)
    assert (out.tokens != decoder.config.mask_token_id).all()
    assert (out.tokens[:, :2] == torch.tensor([258, 259])).all()
    assert (out.tokens[:, 2:] < 260).all()  # only text tokens + end-of-text are predicted
    assert ((out.confidences[:, 2:] > 0) & (out.confidences[:, 2:] <= 1)).all()


def test_same_step_adjacent_duplicates_are_deferred(decoder):
    """With one step nothing can be deferred; with more steps and the rule on, adjacent repeats committed in
    the same step are re-decided later: the rule changes the result on this repetitive random model."""
    cond = torch.randn(1, 20, 32)
    base = DecodingOptions(strategy="confidence", steps=4, seq_len=32, candidates=1, seed=0)
    plain = parallel_diffusion_decode(decoder, cond, base, prefix_ids=[258, 259], pad_id=256)
    rows = plain.tokens[0, 2:]
    assert (rows[1:] == rows[:-1]).any(), "fixture model should repeat tokens"
    ruled = parallel_diffusion_decode(decoder, cond, DecodingOptions(**{**base.to_dict(), "schedule": base.schedule,
                                                                        "repeat_penalty": 0.5}),
                                      prefix_ids=[258, 259], pad_id=256)
    assert (ruled.tokens != decoder.config.mask_token_id).all()
    assert not torch.equal(ruled.tokens, plain.tokens)


def test_refine_pass_repredicts_the_least_confident_and_the_duplicates(decoder):
    """One mask-predict pass: the lowest-confidence share of the transcript and every token equal to its left
    neighbour are re-masked and predicted again from the rest; nothing else changes."""
    torch.manual_seed(3)
    P, L, pad = 2, 20, 256
    canvas = torch.randint(0, 200, (1, L))
    canvas[0, :P] = torch.tensor([258, 259])
    canvas[0, 14:] = pad  # 12 transcript tokens, then end-of-text
    canvas[0, 6] = canvas[0, 5]  # a duplicate
    confidences = torch.rand(1, L) * 0.5 + 0.5
    confidences[0, :P] = 1.0
    confidences[0, 9], confidences[0, 11], confidences[0, 3] = 0.01, 0.02, 0.03  # the three least sure
    refine = Refine(passes=2, fraction=0.25, keep=None)
    cond = torch.randn(1, 20, 32)
    kv = decoder.precompute_cross_kv(cond)
    batch = Batch(decoder, SharedForward(decoder, kv, 1), 1, P, pad)
    out, conf = _refine_pass(batch, canvas, confidences, refine.share(0), None)
    masked = torch.zeros(L, dtype=torch.bool)
    masked[[3, 9, 11, 6]] = True  # ceil(12 x 0.25) = 3 least confident + the duplicate
    x = torch.where(masked, torch.tensor(decoder.config.mask_token_id), canvas[0])
    probs = torch.softmax(decoder(x[None], cross_kv=kv)[0].float(), -1)
    assert torch.equal(out[0, ~masked], canvas[0, ~masked]) and torch.equal(conf[0, ~masked], confidences[0, ~masked])
    assert torch.equal(out[0, masked], probs[masked].argmax(-1))
    torch.testing.assert_close(conf[0, masked], probs[masked].max(-1).values)
    # The second (last) pass re-masks half as many: ceil(12 x 0.125) = 2.
    out2, _ = _refine_pass(batch, canvas, confidences, refine.share(1), None)
    changed_allowed = torch.zeros(L, dtype=torch.bool)
    changed_allowed[[9, 11, 6]] = True  # the two least sure + the duplicate
    assert torch.equal(out2[0, ~changed_allowed], canvas[0, ~changed_allowed])


def test_refine_pass_remasks_the_second_copy_of_a_repeated_pair(decoder):
    """ "can do can do": a pair equal to the pair before it is the two-token form of a parallel duplicate."""
    P, pad = 2, 256
    canvas = torch.tensor([[258, 259, 10, 11, 20, 21, 20, 21, 30, 31, pad, pad, pad, pad]])
    L = canvas.size(1)
    confidences = torch.full((1, L), 0.9)
    confidences[0, 2] = 0.1  # the least sure: ceil(8 x 0.1) = 1 token
    kv = decoder.precompute_cross_kv(torch.randn(1, 20, 32))
    batch = Batch(decoder, SharedForward(decoder, kv, 1), 1, P, pad)
    out, conf = _refine_pass(batch, canvas, confidences, Refine(passes=1, fraction=0.1, keep=None).share(0), None)
    masked = torch.zeros(L, dtype=torch.bool)
    masked[[2, 6, 7]] = True  # the least confident and the second "20 21"
    x = torch.where(masked, torch.tensor(decoder.config.mask_token_id), canvas[0])
    probs = torch.softmax(decoder(x[None], cross_kv=kv)[0].float(), -1)
    assert torch.equal(out[0, ~masked], canvas[0, ~masked]) and torch.equal(conf[0, ~masked], confidences[0, ~masked])
    assert torch.equal(out[0, masked], probs[masked].argmax(-1))


@pytest.mark.parametrize("case,blocks,extra", [
    ("blocks", 3, {}), ("blocks_sampled", 2, {"candidates": 3, "temperature": 0.8, "repeat_penalty": 0.5})])
def test_block_filling_decodes_as_the_option_did(case, blocks, extra):
    """FillInBlocks, the `blocks` option before it left DecodingOptions, gives the tokens it gave (recorded
    in tests/data/decoding_recorded.json from the old code, windows decoded in a batch; here each alone)."""
    from test_decoding_recorded import RECORDED, WINDOWS, _conditions, _decoders

    recorded = json.loads(RECORDED.read_text())
    for family, (dec, prefix, pad) in _decoders().items():
        for i, (cond, (_, seconds)) in enumerate(zip(_conditions(dec.config.n_embd), WINDOWS)):
            options = DecodingOptions(**{"steps": 6, "seq_len": None, "max_seq_len": 40, "seed": 3 + i,
                                         "strategy": "confidence", "candidates": 1, **extra})
            out = decode_traced(dec, cond, options, Trace(policies=[FillInBlocks(blocks)]), prefix, pad, seconds)
            then = recorded[f"{family}/{case}"][i]
            assert out.tokens.tolist() == then["tokens"] and out.text_tokens == then["text_tokens"], (family, i)


def test_refine_no_copy_bans_only_a_copys_left_neighbour():
    """refine_no_copy: at a re-masked position equal to its left neighbour, that token (and only it) gets -inf,
    over the whole vocabulary or through a shortlist's ids; other positions keep their logits."""
    from whisfusion_cli.decoding import _ban_copies, _copies

    canvas = torch.tensor([[7, 8, 5, 5, 6, 6, 9, 9]])  # prefix 2; the end of text is 9
    copies = _copies(canvas, canvas == 9, 2)
    assert copies.tolist() == [[False, False, False, True, False, True, False, False]]
    logits = torch.zeros(3, 10)
    left, is_copy = torch.tensor([5, 5, 6]), torch.tensor([True, False, True])
    banned = _ban_copies(logits, left, is_copy, None)
    assert torch.isinf(banned).nonzero().tolist() == [[0, 5], [2, 6]]
    short = (torch.tensor([6, 5, 9]), None)
    banned = _ban_copies(torch.zeros(3, 3), left, is_copy, short)
    assert torch.isinf(banned).nonzero().tolist() == [[0, 1], [2, 0]]
