#!/usr/bin/env python
"""What Whisper tiny.en's own causal decoder (verify.py's verifier) reads from each encoder mode: on a tune
manifest, each clip encoded whole in "short" (audio-length, what the default model runs on), "pad_trim" (30 s
encoded, the audio's frames kept) and "full" (30 s, all 1,500 frames), then

- teacher-forced: the share of the reference's text tokens that are the decoder's top choice, and whether it
  puts end-of-text after the last one;
- greedy: its own transcript, stopped at end-of-text (or at twice the reference's tokens), corpus WER.

    python scripts/verifier_diagnostics.py MANIFEST [--modes short,pad_trim,full] [--pad 1,2,4]

--pad: also "short" with that many seconds of zero padding encoded after each clip (all frames kept).

docs/EXPERIMENTS.md ("Verification by tiny.en's own decoder") has what it measured. Manifests and audio are read,
and WER computed, as `whisfusion bench` does (the test extra: jiwer, whisper-normalizer).
"""

from __future__ import annotations

import argparse

import numpy as np

from whisfusion_cli.bench.metrics import corpus_error_rates
from whisfusion_cli.bench.run import read_item_audio
from whisfusion_cli.data import read_dataset
from whisfusion_cli.audio import SAMPLE_RATE
from whisfusion_cli.encoder import EncoderOptions, NumpyWhisperEncoder, WhisperAudioEncoder
from whisfusion_cli.loading import load_model
from whisfusion_cli.numpy_model import SelfAttentionCache
from whisfusion_cli.verify import Verifier
from whisfusion_cli.whisper_source import open_whisper


def teacher_forced(verifier: Verifier, states: np.ndarray, text: list[int]) -> tuple[int, bool]:
    """(text tokens that are the decoder's top choice, end-of-text its top choice after them)."""
    d = verifier.decoder
    ids = verifier.prefix + text
    hidden = d.hidden_states(np.array([ids]), d.cross_kv(states[None]), cache=SelfAttentionCache(d.n_layer))[0]
    choices = d.project(hidden[len(verifier.prefix) - 1:]).argmax(-1)
    return int((choices[:-1] == np.array(text)).sum()), int(choices[-1]) == verifier.eos_id


def greedy(verifier: Verifier, states: np.ndarray, limit: int) -> list[int]:
    d = verifier.decoder
    kv, cache = d.cross_kv(states[None]), SelfAttentionCache(d.n_layer)
    out, pending = [], list(verifier.prefix)
    while len(out) < limit:
        choice = int(d.project(d.hidden_states(np.array([pending]), kv, cache=cache)[0, -1:]).argmax())
        if choice == verifier.eos_id:
            break
        out.append(choice)
        pending = [choice]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest")
    ap.add_argument("--modes", default="short,pad_trim,full")
    ap.add_argument("--pad", default="", help="comma-separated seconds of padding for extra short-mode runs")
    args = ap.parse_args()
    items = read_dataset(args.manifest)
    clips = [read_item_audio(item) for item in items]
    tokenizer = load_model(None, engine="numpy").tokenizer
    checkpoint = open_whisper("tiny.en")
    verifier = Verifier.from_checkpoint(checkpoint, tokenizer.prefix_ids, tokenizer.eos_id)
    print(f"{args.manifest}: {len(items)} clips")
    runs = [(mode, None) for mode in args.modes.split(",") if mode]
    runs += [(f"short+{p}s", float(p)) for p in args.pad.split(",") if p]
    padded = NumpyWhisperEncoder(checkpoint, EncoderOptions(mode="short")) if args.pad else None
    for mode, pad in runs:
        if pad is None:
            states = WhisperAudioEncoder("tiny.en", EncoderOptions(mode=mode)).encode(clips)
        else:  # the short mode's every frame of each clip with `pad` seconds of zeros after it
            states = padded.encode([np.pad(c, (0, round(pad * SAMPLE_RATE))) for c in clips])
        right = total = ends = 0
        hyps = []
        for item, s in zip(items, states):
            s = np.asarray(s, np.float32)
            text = tokenizer.encode(item.text)
            hit, end = teacher_forced(verifier, s, text)
            right, total, ends = right + hit, total + len(text), ends + end
            hyps.append(tokenizer.decode(greedy(verifier, s, 2 * len(text) + 5)))
        wer = 100 * corpus_error_rates([item.text for item in items], hyps)["wer"]
        print(f"  {mode:9s} teacher-forced top-1 {right / total:.3f}, end-of-text after the text {ends}/{len(items)}; "
              f"greedy WER {wer:.1f}%")


if __name__ == "__main__":
    main()
