"""End-to-end speed and accuracy on one recording of several minutes: Whisfusion vs Whisper tiny.en
(faster-whisper, int8), same CPU threads, measured side by side in one run.

The recording is built at run time from the real-speech clips of tests/data/audio (realspeech.jsonl: 13
clips, ~75 s): the clips in order, --repeats times, with --gap seconds of silence between clips, written
to a temporary WAV; the reference is the clips' transcripts joined. Whisfusion runs through the public API
(`whisfusion_cli.transcribe`: VAD windows, encoder, Parallel Diffusion Decoding) on the file; faster-whisper
runs as `whisfusion bench` runs it (bench.systems.FasterWhisperSystem: greedy, temperature 0, no previous-text
conditioning, no VAD) on the same file's samples, reading included. Model loading is not timed; one
unmeasured warm-up on a short clip precedes the timed runs, and each system's time is the best of --runs.

Prints the audio length, each system's wall time, RTFx (audio seconds per second) and WER (Whisper English
normaliser + jiwer, bench.corpus_error_rates), and the RTFx ratio.

    python scripts/bench_e2e.py                           # the embedded default model, 2 threads
    python scripts/bench_e2e.py --model RUN/model --int8 --json results/e2e.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from whisfusion_cli.choices import ENCODER_BACKENDS
from whisfusion_cli.fileio import write_atomic

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / "tests" / "data" / "audio"
MANIFEST = CLIPS / "realspeech.jsonl"
SAMPLE_RATE = 16000


def build_recording(out_dir: Path, repeats: int, gap: float) -> tuple[Path, str, float]:
    """(wav path, reference transcript, seconds): the manifest's clips, `repeats` times, with silences."""
    import soundfile as sf

    from whisfusion_cli.audio import load_audio

    items = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    clips = [load_audio(CLIPS / item["audio"]) for item in items]
    silence = np.zeros(int(gap * SAMPLE_RATE), dtype=np.float32)
    parts, refs = [], []
    for _ in range(repeats):
        for clip, item in zip(clips, items):
            parts += [clip, silence]
            refs.append(item["text"])
    audio = np.concatenate(parts)
    path = out_dir / "recording.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return path, " ".join(refs), len(audio) / SAMPLE_RATE


def timed_stages(pipeline) -> dict:
    """Wrap the pipeline's encode and decode with timers; the returned dict accumulates their seconds."""
    stages = {"encode": 0.0, "decode": 0.0, "windows": 0}
    encode, decode = pipeline.encode, pipeline.decode

    def timed_encode(clips):
        t0 = time.perf_counter()
        try:
            return encode(clips)
        finally:
            stages["encode"] += time.perf_counter() - t0
            stages["windows"] += len(clips)

    def timed_decode(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return decode(*args, **kwargs)
        finally:
            stages["decode"] += time.perf_counter() - t0

    pipeline.encode, pipeline.decode = timed_encode, timed_decode
    return stages


def time_runs(fn, runs: int) -> tuple[float, str]:
    best, text = float("inf"), ""
    for _ in range(runs):
        t0 = time.perf_counter()
        text = fn()
        best = min(best, time.perf_counter() - t0)
    return best, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Whisfusion model directory or name (default: the embedded one)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both systems")
    ap.add_argument("--repeats", type=int, default=4, help="times the 13 clips are joined (4: ~4.3 min)")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds of silence between clips")
    ap.add_argument("--runs", type=int, default=1, help="timed runs per system (best is kept)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None,
                    help="Whisfusion with (--no-int8: without) the int8 decoder and encoder (default: the model's "
                         "choice, as `whisfusion transcribe`)")
    ap.add_argument("--encoder-backend", default=None, choices=ENCODER_BACKENDS,
                    help="Whisfusion's encoder backend (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=8, help="Whisfusion windows per batch")
    ap.add_argument("--candidates", "-k", type=int, default=None, help="override the model's K")
    ap.add_argument("--steps", type=int, default=None, help="override the model's steps")
    ap.add_argument("--seq-len", default=None, help="override the canvas: a length or 'auto'")
    ap.add_argument("--max-window", type=float, default=None,
                    help="Whisfusion's longest VAD window in seconds (default: the VAD's, 30 s)")
    ap.add_argument("--skip-whisper", action="store_true", help="only Whisfusion")
    ap.add_argument("--show", action="store_true", help="print both transcripts")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)

    import torch

    from whisfusion_cli.bench import BenchOptions, corpus_error_rates, parse_system
    from whisfusion_cli.bench.systems import FasterWhisperSystem
    from whisfusion_cli.loading import Pipeline
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe
    from whisfusion_cli.vad import VadOptions

    torch.set_num_threads(args.threads)
    decoding = {"seed": 0}
    for key, value in (("candidates", args.candidates), ("steps", args.steps)):
        if value is not None:
            decoding[key] = value
    if args.seq_len is not None:
        decoding["seq_len"] = None if args.seq_len == "auto" else int(args.seq_len)
    options = TranscribeOptions(model=args.model, device="cpu", threads=args.threads, int8=args.int8,
                                encoder_backend=args.encoder_backend, batch_size=args.batch_size, decoding=decoding,
                                vad=VadOptions(max_window_s=args.max_window, min_cut_s=args.max_window / 2)
                                if args.max_window else VadOptions())
    report: dict = {"threads": args.threads, "encoder_backend": args.encoder_backend}
    with tempfile.TemporaryDirectory() as tmp:
        path, reference, seconds = build_recording(Path(tmp), args.repeats, args.gap)
        report["audio_s"] = seconds
        print(f"recording: {seconds:.1f} s ({args.repeats} x {MANIFEST.parent.name}/{MANIFEST.name}), "
              f"{len(reference.split())} reference words, {args.threads} threads", flush=True)

        pipeline = Pipeline.load(options)
        report["int8"] = pipeline.model.int8
        stage_s = timed_stages(pipeline)
        warm = CLIPS / "goforward.flac"
        list(transcribe([warm], options, model=pipeline))

        def run_whisfusion() -> str:
            (result,) = transcribe([path], options, model=pipeline)
            if result.status != "ok":
                raise SystemExit(f"whisfusion failed on {path}: {result.error or result.status}")
            return result.text

        stage_s.update(encode=0.0, decode=0.0, windows=0)
        t_wf, text_wf = time_runs(run_whisfusion, args.runs)
        per_run = {k: v / args.runs for k, v in stage_s.items()}
        wer_wf = corpus_error_rates([reference], [text_wf])["wer"]
        d = pipeline.decoding
        label = (f"Whisfusion ({pipeline.model.name}{', int8' if pipeline.model.int8 else ''}, "
                 f"{pipeline.model.encoder.backend} encoder; K={d.candidates}, "
                 f"{d.steps} steps, {d.strategy}, canvas {d.seq_len or 'audio-sized'})")
        report["whisfusion"] = {"label": label, "s": t_wf, "rtfx": seconds / t_wf, "wer": wer_wf,
                                "decoding": d.to_dict(), "stages_s": per_run, "text": text_wf}
        print(f"{label}\n  {t_wf:7.2f} s   RTFx {seconds / t_wf:7.1f}   WER {wer_wf:6.1%}   (per run: "
              f"{per_run['windows']:.0f} windows, encoder {per_run['encode']:.2f} s, "
              f"decoder {per_run['decode']:.2f} s)", flush=True)

        if not args.skip_whisper:
            from whisfusion_cli.audio import load_audio

            fw = FasterWhisperSystem(parse_system("faster-whisper:tiny.en,compute_type=int8"),
                                     BenchOptions(threads=args.threads, device="cpu"))
            fw.transcribe(load_audio(warm))
            t_fw, text_fw = time_runs(lambda: fw.transcribe(load_audio(path)).text, args.runs)
            wer_fw = corpus_error_rates([reference], [text_fw])["wer"]
            report["faster_whisper"] = {"label": "Whisper tiny.en, faster-whisper int8, greedy", "s": t_fw,
                                        "rtfx": seconds / t_fw, "wer": wer_fw, "text": text_fw}
            print(f"Whisper tiny.en (faster-whisper int8, greedy)\n  {t_fw:7.2f} s   RTFx {seconds / t_fw:7.1f}   "
                  f"WER {wer_fw:6.1%}", flush=True)
            ratio = t_fw / t_wf
            report["rtfx_ratio"] = ratio
            print(f"RTFx ratio Whisfusion / faster-whisper: {ratio:.2f}x  "
                  f"(WER {wer_wf:.1%} vs {wer_fw:.1%})")
        if args.show:
            print(f"\nreference : {reference}\nwhisfusion: {text_wf}")
            if "faster_whisper" in report:
                print(f"whisper   : {report['faster_whisper']['text']}")
    if args.json:
        write_atomic(Path(args.json), json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
