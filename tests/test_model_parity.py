"""The upstream parity fixture (tests/data/decoder_parity, made by running upstream Whisfusion)."""

import json

import pytest
import torch

from whisfusion_cli.checkpoint import load_decoder
from whisfusion_cli.decoding import DecodingOptions, decode_traced, parallel_diffusion_decode
from whisfusion_cli.upstream import Trace

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def io(parity_dir):
    return torch.load(parity_dir / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def pdd(parity_dir):
    return torch.load(parity_dir / "pdd.pt", weights_only=True)


@pytest.mark.parametrize("weights", ["weights.pt", "weights.safetensors"])
@pytest.mark.parametrize("config_kind", ["json_path", "dict"])
def test_logits_match_upstream(parity_dir, io, weights, config_kind):
    config = parity_dir / "config.json"
    if config_kind == "dict":
        config = json.loads(config.read_text())
    dec = load_decoder(parity_dir / weights, config=config, dtype=torch.float32)
    assert not dec.training
    with torch.no_grad():
        logits = dec(io["idx"], condition=io["condition"].to(torch.float32))
        logits_nc = dec(io["idx"], condition=None)
    assert logits.shape == (3, 48, 512)
    torch.testing.assert_close(logits, io["logits"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits_nc, io["logits_no_condition"], atol=ATOL, rtol=RTOL)
    # The condition matters, so the check above is not vacuous.
    assert (io["logits"] - io["logits_no_condition"]).abs().max() > 10 * ATOL


def test_mask_token_never_predicted(parity_dir, io):
    dec = load_decoder(parity_dir / "weights.pt", config=parity_dir / "config.json")
    assert dec.config.mask_token_id == io["mask_token_id"] == 512
    assert dec.transformer.wte.weight.shape[0] == 513 and dec.lm_head.weight.shape[0] == 512


@pytest.mark.parametrize("reference", [False, True])
def test_parallel_diffusion_decoding_matches_upstream(parity_dir, io, pdd, reference):
    dec = load_decoder(parity_dir / "weights.safetensors", config=parity_dir / "config.json")
    cond = io["condition"][0:1].to(torch.float32)
    options = DecodingOptions(candidates=pdd["K"], steps=pdd["steps"], schedule=tuple(pdd["mask_ratio_schedule"]),
                              seq_len=pdd["seq_len"])
    trace = Trace(masks=list(pdd["masks"]), inputs=[], reference=reference)
    out = decode_traced(dec, cond, options, trace, prefix_ids=[pdd["bos_id"]], pad_id=pdd["pad_id"])
    for s in range(pdd["steps"]):
        assert torch.equal(trace.inputs[s], pdd["step_inputs"][s]), f"step {s} input"
    assert torch.equal(out.tokens, pdd["final_tokens"])
    torch.testing.assert_close(out.confidences, pdd["confidences"], atol=1e-7, rtol=0)
    torch.testing.assert_close(out.scores, pdd["avg_confidence"], atol=1e-7, rtol=0)
    assert out.selected == pdd["selected_index"] == 2


def test_entry_point_signature(parity_dir, io, pdd):
    """The conformance run of the first issue (K=4, 4 steps, upstream's schedule, a 48-token canvas, BOS 1,
    pad 2, the fixture's masks, confidence selection) through the one signature: decoder, condition, options,
    prefix, pad (upstream's by default), the masks through the test path's Trace."""
    dec = load_decoder(parity_dir / "weights.pt", config=str(parity_dir / "config.json"), dtype=torch.float32)
    cond = io["condition"][0:1].to(torch.float32)
    options = DecodingOptions(candidates=4, steps=4, schedule=(1.0, 0.9, 0.85, 0.8), seq_len=48,
                              selection="confidence", seed=None)
    out = decode_traced(dec, cond, options, Trace(masks=[m for m in pdd["masks"]]), prefix_ids=[1], pad_id=2)
    assert out.tokens.shape == (4, 48) and out.confidences.shape == (4, 48) and out.scores.shape == (4,)
    assert torch.equal(out.tokens, pdd["final_tokens"]) and out.selected == 2


def test_step_intermediates(parity_dir, io, pdd):
    """Every step's argmax on the recorded inputs equals upstream's (catches overwriting unmasked positions)."""
    dec = load_decoder(parity_dir / "weights.pt", config=parity_dir / "config.json")
    cond = io["condition"][0:1].to(torch.float32).expand(4, -1, -1)
    with torch.no_grad():
        for s in range(4):
            argmax = dec(pdd["step_inputs"][s], condition=cond).argmax(-1)
            assert torch.equal(argmax, pdd["step_argmax"][s])
            canvas = torch.where(pdd["masks"][s], argmax, pdd["step_inputs"][s])
            assert torch.equal(canvas, pdd["step_outputs"][s])


def test_seeded_decoding_reproducible(parity_dir, io):
    dec = load_decoder(parity_dir / "weights.pt", config=parity_dir / "config.json")
    cond = io["condition"][0:1].to(torch.float32)
    a = parallel_diffusion_decode(dec, cond, DecodingOptions(candidates=3, steps=5, seq_len=32, seed=7))
    b = parallel_diffusion_decode(dec, cond, DecodingOptions(candidates=3, steps=5, seq_len=32, seed=7))
    c = parallel_diffusion_decode(dec, cond, DecodingOptions(candidates=3, steps=5, seq_len=32, seed=8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.confidences, b.confidences)
    assert not torch.equal(a.confidences, c.confidences)


def test_fallback_ratio_used_past_schedule():
    o = DecodingOptions(steps=6)
    assert [o.ratio(s) for s in range(6)] == [1.0, 0.9, 0.85, 0.8, 0.7, 0.7]


def test_selection_unit(pdd):
    from whisfusion_cli.decoding import select_by_confidence

    su = pdd["selection_unit"]
    valid = su["tokens"] != 2
    assert torch.equal(valid, su["valid_mask"])
    scores = (su["confidences"] * valid).sum(1) / valid.sum(1).clamp(min=1)
    assert torch.equal(scores, su["avg_confidence"])
    assert select_by_confidence(scores) == su["selected_index"] == 1


def test_fast_and_reference_agree_on_random_draws(parity_dir, io):
    dec = load_decoder(parity_dir / "weights.pt", config=parity_dir / "config.json")
    cond = io["condition"][1:2].to(torch.float32)
    options = DecodingOptions(candidates=5, steps=6, seq_len=40, seed=3)
    outs = [parallel_diffusion_decode(dec, cond, options), decode_traced(dec, cond, options, Trace(reference=True))]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    torch.testing.assert_close(outs[0].confidences, outs[1].confidences, atol=1e-6, rtol=0)
