"""Tokens of tiny random decoders against tokens recorded from the code before the decoding redesign (issue 21).

tests/data/decoding_recorded.json was written by this module's `record()` on the old code (`python
tests/test_decoding_recorded.py` at main's ca2a2e2); the policies of the confidence strategy, the reference loop
moved to its own module and the one entry point must decode to the very same tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

RECORDED = Path(__file__).parent / "data" / "decoding_recorded.json"
# (frames, seconds) per window: canvases and encoder states of different lengths in one batch.
WINDOWS = [(60, 2.0), (40, 5.0), (60, 3.0), (50, 2.0)]
BASE = {"steps": 4, "seq_len": None, "max_seq_len": 40, "seed": 3}
CASES = {
    "remask": {"strategy": "remask", "candidates": 3},
    "remask_mbr": {"strategy": "remask", "candidates": 3, "selection": "mbr"},
    "confidence": {"strategy": "confidence", "candidates": 1},
    "repeat_penalty": {"strategy": "confidence", "candidates": 1, "repeat_penalty": 0.5},
    "refine": {"strategy": "confidence", "candidates": 1, "refine": 2},
    "sampled": {"strategy": "confidence", "candidates": 3, "temperature": 0.8, "repeat_penalty": 0.3},
    "sampled_rover": {"strategy": "confidence", "candidates": 3, "temperature": 0.8, "selection": "rover"},
    "shortlist": {"strategy": "confidence", "candidates": 3, "temperature": 0.8, "shortlist": 4, "refine": 1},
    "pad_context": {"strategy": "confidence", "candidates": 2, "temperature": 0.5, "repeat_penalty": 0.5,
                    "pad_context": 2, "refine": 2},
    "everything": {"strategy": "confidence", "candidates": 3, "temperature": 1.0, "repeat_penalty": 0.5,
                   "shortlist": 6, "pad_context": 3, "refine": 3, "steps": 6},
    "fixed_canvas": {"strategy": "confidence", "candidates": 2, "temperature": 0.5, "seq_len": 24, "refine": 1},
}


def _decoders():
    from tiny_model import make_decoder

    from whisfusion_cli.model import ModelConfig, WhisperDiffusionDecoder, init_weights

    smdm = make_decoder(seed=3)
    torch.manual_seed(2)
    whisper = WhisperDiffusionDecoder(ModelConfig(family="whisper", n_layer=2, n_head=2, n_embd=32,
                                                  intermediate_size=64, vocab_size=80, block_size=64,
                                                  output_vocab_size=60))
    init_weights(whisper, std=0.3)  # peaky: confident, repetitive predictions, like a trained model's
    return {"smdm": (smdm.eval(), [1], 2), "whisper": (whisper.eval(), [57, 58], 59)}


def _conditions(dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(f, dim, generator=g) for f, _ in WINDOWS]


def decode_all() -> dict:
    """{family/case: [per window: {"tokens", "selected", "text_tokens", "scores"}]} of every case."""
    from whisfusion_cli.decoding import DecodingOptions, decode_windows

    out = {}
    for family, (decoder, prefix, pad) in _decoders().items():
        conds = _conditions(decoder.config.n_embd)
        for name, case in CASES.items():
            options = DecodingOptions(**{**BASE, **case})
            results = decode_windows(decoder, conds, options, prefix, pad, [s for _, s in WINDOWS],
                                     max_batch_windows=3)
            out[f"{family}/{name}"] = [{"tokens": r.tokens.tolist(), "selected": r.selected,
                                        "text_tokens": r.text_tokens, "scores": r.scores.tolist()}
                                       for r in results]
    return out


def record() -> None:
    RECORDED.write_text(json.dumps(decode_all(), separators=(",", ":")) + "\n")


@pytest.fixture(scope="module")
def decoded():
    return decode_all()


@pytest.mark.parametrize("key", [f"{f}/{c}" for f in ("smdm", "whisper") for c in CASES])
def test_tokens_as_recorded_before_the_redesign(decoded, key):
    recorded = json.loads(RECORDED.read_text())[key]
    for i, (now, then) in enumerate(zip(decoded[key], recorded, strict=True)):
        assert now["tokens"] == then["tokens"], f"window {i}"
        assert (now["selected"], now["text_tokens"]) == (then["selected"], then["text_tokens"]), f"window {i}"
        torch.testing.assert_close(torch.tensor(now["scores"]), torch.tensor(then["scores"]), atol=1e-6, rtol=0)


def test_the_recorded_cases_differ():
    """The options change the tokens (or the selection's text), so the comparison above covers every policy."""
    recorded = json.loads(RECORDED.read_text())
    for family in ("smdm", "whisper"):
        tokens = {name: json.dumps([(w["tokens"], w["text_tokens"]) for w in recorded[f"{family}/{name}"]])
                  for name in CASES}
        assert len(set(tokens.values())) == len(CASES), family


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    record()
