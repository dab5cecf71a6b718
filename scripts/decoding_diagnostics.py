#!/usr/bin/env python
"""Where do a model's errors come from: its decoding or the model? Two diagnostics on tune manifests, each
clip decoded whole by the torch engine (float32), corpus WER with the Whisper English normaliser:

    python scripts/decoding_diagnostics.py length MANIFEST [--model DIR]
        the model's own transcript length against the reference's token count forced (end-of-text banned
        before it, required after), exact decoding (whole vocabulary, whole canvas), no refinement
    python scripts/decoding_diagnostics.py variants MANIFEST [MANIFEST ...] [--model DIR]
        the model's decoding defaults against more steps, more refinement passes and a left-to-right bias
        of the commit order (semi-autoregressive filling)

docs/EXPERIMENTS.md ("Length, order and steps") has what they measured. Manifests and audio are read, and
WER computed, as `whisfusion bench` does. Needs the test extra (jiwer, whisper-normalizer).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from whisfusion_cli.audio import SAMPLE_RATE
from whisfusion_cli.bench.metrics import corpus_error_rates
from whisfusion_cli.bench.run import read_item_audio
from whisfusion_cli.data import read_dataset
from whisfusion_cli.decoding import Policy, decode_traced
from whisfusion_cli.loading import load_model
from whisfusion_cli.upstream import Trace


class ForceLength(Policy):
    """The transcript is exactly n tokens: end-of-text banned before position P + n and the only choice after."""

    def __init__(self, n: int, P: int, pad_id: int):
        self.n, self.P, self.pad_id = n, P, pad_id

    def plan(self, step) -> None:
        self.masked = step.masked

    def observe(self, batch, w: int, logits) -> None:  # the whole vocabulary: no shortlist in this diagnostic
        positions = self.masked[w].nonzero().flatten()
        inside = positions < self.P + self.n
        end = logits[~inside, self.pad_id].clone()
        logits[inside, self.pad_id] = float("-inf")
        logits[~inside] = float("-inf")
        logits[~inside, self.pad_id] = end


class LeftBias(Policy):
    """Commit order leaning left to right: a masked position's confidence less `weight` x its distance from the
    row's first masked position, over the transcript's length."""

    def __init__(self, weight: float):
        self.weight = weight

    def rescore(self, step) -> None:
        L = step.canvas.size(1)
        pos = torch.arange(L, device=step.canvas.device, dtype=torch.float32)[None, :]
        first = torch.where(step.masked, pos, torch.full_like(pos, float(L))).min(1, keepdim=True).values
        n = step.n_gen.clamp(min=1)[:, None].float()
        step.scores = torch.where(step.masked, step.scores - self.weight * (pos - first) / n, step.scores)


def corpus_wer(refs: list[str], hyps: list[str]) -> float:
    return 100 * corpus_error_rates(refs, hyps)["wer"]


def decode_all(model, options, clips, policies=lambda text: []) -> list[str]:
    """Each clip's text; options: DecodingOptions, or a function (duration, reference) -> DecodingOptions."""
    tok = model.tokenizer
    out = []
    for audio, text, states in clips:
        duration = len(audio) / SAMPLE_RATE
        opts = options(duration, text) if callable(options) else options
        result = decode_traced(model.decoder, states, opts, Trace(policies=policies(text)), tok.prefix_ids,
                               tok.pad_id, duration)
        out.append(tok.decode(result.text_tokens))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("length", "variants"))
    ap.add_argument("manifests", nargs="+", type=Path)
    ap.add_argument("--model", default=None, help="a model directory (default: the embedded default)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, int8=False)
    tok = model.tokenizer
    sets = []
    for manifest in a.manifests:
        clips = [(read_item_audio(item), item.text) for item in read_dataset(manifest)]
        sets.append([(audio, text, model.encoder.encode([audio])[0]) for audio, text in clips])
    if a.what == "length":
        P = len(tok.prefix_ids)
        exact = dataclasses.replace(model.decoding, shortlist=0, pad_context=None, refine=0)

        def canvas(duration: float, text: str):  # the audio-sized canvas, with room for the forced length
            return dataclasses.replace(exact, seq_len=max(exact.canvas_length(duration, P), P + len(tok.encode(text)) + 2))

        for manifest, clips in zip(a.manifests, sets):
            refs = [text for _, text, _ in clips]
            own = decode_all(model, canvas, clips)
            forced = decode_all(model, canvas, clips, lambda text: [ForceLength(len(tok.encode(text)), P, tok.pad_id)])
            print(f"{manifest}: own length {corpus_wer(refs, own):.1f}%, reference length forced "
                  f"{corpus_wer(refs, forced):.1f}%")
        return
    variants = {
        "defaults": ({}, lambda text: []),
        "left-to-right bias 0.3": ({}, lambda text: [LeftBias(0.3)]),
        "left-to-right bias 1.0": ({}, lambda text: [LeftBias(1.0)]),
        "16 steps": ({"steps": 16}, lambda text: []),
        "8 refine passes": ({"refine": 8}, lambda text: []),
    }
    for name, (changes, policies) in variants.items():
        options = dataclasses.replace(model.decoding, **changes)
        wers = [corpus_wer([t for _, t, _ in clips], decode_all(model, options, clips, policies)) for clips in sets]
        print(f"{name:24s} " + " ".join(f"{w:5.1f}%" for w in wers) + f"   mean {sum(wers) / len(wers):.1f}")


if __name__ == "__main__":
    main()
