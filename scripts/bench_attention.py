"""Attention's softmax in place against a fresh array, side by side in one run: the numpy encoder on 30 s
("full" mode, Whisper's own input; `--verify-short` pads short windows to 10 s) and on a 5 s window ("short" mode, what
every window runs), the same numbers either way (asserted); with --manifest, also whole transcriptions of its
clips (the model loaded once; each clip by both, alternating; the same text asserted).

    python scripts/bench_attention.py [--repeats 5] [--threads 2] [--manifest M.jsonl [--verify-short 2]]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from whisfusion_cli import numpy_model
from whisfusion_cli.encoder import EncoderOptions, NumpyWhisperEncoder
from whisfusion_cli.whisper_source import open_whisper

SAMPLE_RATE = 16000


IN_PLACE_SOFTMAX = numpy_model.softmax


def fresh_softmax(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    return IN_PLACE_SOFTMAX(x, in_place=False)  # what attention ran before: a new array for each step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--manifest", type=Path, default=None, help="also time transcribing these clips")
    parser.add_argument("--verify-short", type=float, default=0.0, help="decoding.verify_short for --manifest")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads, user_api="blas")
    checkpoint = open_whisper("tiny.en")
    rng = np.random.default_rng(0)
    for mode, seconds in (("full", 1.0), ("short", 5.0)):
        encoder = NumpyWhisperEncoder(checkpoint, EncoderOptions(mode=mode))
        clip = rng.normal(0, 0.05, int(seconds * SAMPLE_RATE)).astype(np.float32)
        best = {"fresh": float("inf"), "in place": float("inf")}
        outputs = {}
        for _ in range(args.repeats):  # interleaved, so load from elsewhere hits both alike; best of each
            for name, impl in (("fresh", fresh_softmax), ("in place", IN_PLACE_SOFTMAX)):
                numpy_model.softmax = impl
                t0 = time.perf_counter()
                outputs[name] = encoder.encode([clip])[0]
                best[name] = min(best[name], time.perf_counter() - t0)
        numpy_model.softmax = IN_PLACE_SOFTMAX
        assert np.array_equal(outputs["fresh"], outputs["in place"]), "the two softmaxes gave other states"
        print(f"encoder {mode:5s} ({seconds:g} s clip, {len(outputs['fresh'])} frames): fresh {best['fresh']:.3f} s, "
              f"in place {best['in place']:.3f} s, {best['fresh'] / best['in place']:.2f}x (same states)")

    if args.manifest is not None:
        transcriptions(args.manifest, args.verify_short)


def transcriptions(manifest: Path, verify_short: float) -> None:
    from whisfusion_cli.loading import Pipeline
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe

    options = TranscribeOptions(decoding={"verify_short": verify_short})
    pipeline = Pipeline.load(options)
    clips = [manifest.parent / json.loads(line)["audio"] for line in manifest.read_text().splitlines() if line.strip()]
    total = {"fresh": 0.0, "in place": 0.0}
    for clip in clips:
        texts = {}
        for name, impl in (("fresh", fresh_softmax), ("in place", IN_PLACE_SOFTMAX)):
            numpy_model.softmax = impl
            t0 = time.perf_counter()
            texts[name] = [r.text for r in transcribe([clip], options, model=pipeline)]
            total[name] += time.perf_counter() - t0
        assert texts["fresh"] == texts["in place"], f"{clip}: other text ({texts})"
    numpy_model.softmax = IN_PLACE_SOFTMAX
    print(f"{manifest} ({len(clips)} clips, verify_short {verify_short:g}): fresh {total['fresh']:.2f} s, "
          f"in place {total['in place']:.2f} s, {total['fresh'] / total['in place']:.2f}x (same text)")


if __name__ == "__main__":
    main()
