"""Batched windows and the int8 decoder, measured side by side in one run (issue: fast decoding).

1. W windows of S seconds decoded one at a time vs together (decode_windows, one forward per step for the
   whole batch), on a tiny.en-sized Whisper-family decoder (tiny.en's weights via
   train.whisper_decoder_from_pretrained, or --random), random encoder states of the window's frame count,
   the audio-sized canvas, K candidates x steps. Tokens must be identical.
2. --int8: the same decode with the decoder's Linear layers int8 (model.quantize_decoder, with and without
   the tied output projection), one window at a time: time, and how many windows' chosen tokens changed.
3. --model DIR: a trained model on real speech (the 13 clips of tests/data/audio/realspeech.jsonl, float
   encoder states, the model's decoding defaults): float vs int8 decoder time, windows whose text changed,
   and WER (Whisper normaliser) of each.
4. --recording: the windows of a real recording, of different lengths (the clips above joined 4 times with
   1 s pauses, cut by the embedded default model's VAD settings, as scripts/bench_e2e.py does), decoded
   one at a time vs in batches of 8 padded to their longest window, with the model's decoding defaults:
   time, windows whose text changed, and WER of each.

    python scripts/bench_batch.py                      # 8 windows of 10 s, K=15, 4 steps, 1 thread
    python scripts/bench_batch.py --int8 --threads 2
    python scripts/bench_batch.py --windows 0 --model whisfusion_cli/assets/default   # int8 on real speech
    python scripts/bench_batch.py --windows 0 --recording --threads 2                 # windows of mixed lengths
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from whisfusion_cli.decoding import DecodingOptions, decode_windows
from whisfusion_cli.encoder import frames_for_duration
from whisfusion_cli.tokenizer import TokenizerConfig


def tiny_en_decoder(random: bool):
    if random:
        from whisfusion_cli.model import ModelConfig, build_decoder, init_weights

        torch.manual_seed(0)
        decoder = build_decoder(ModelConfig(family="whisper", name="tiny.en-sized", n_layer=4, n_head=6, n_embd=384,
                                            intermediate_size=1536, vocab_size=51864, block_size=448,
                                            output_vocab_size=50257))
        init_weights(decoder)
        return decoder.eval()
    from whisfusion_cli.train import whisper_decoder_from_pretrained

    return whisper_decoder_from_pretrained("tiny.en", 384).eval()


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="0: skip the batching part")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--candidates", type=int, default=15)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--strategy", default="remask", choices=("remask", "confidence"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every timing")
    ap.add_argument("--random", action="store_true", help="random weights instead of tiny.en's")
    ap.add_argument("--int8", action="store_true", help="also time the int8 decoder")
    ap.add_argument("--model", default=None, help="trained model directory for the int8 check on real speech")
    ap.add_argument("--recording", action="store_true", help="mixed-length windows of a real recording")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    report = batch_and_int8(args) if args.windows > 0 else {}
    if args.model:
        report["int8_speech"] = int8_on_speech(args.model, args.repeats)
    if args.recording:
        report["recording"] = mixed_lengths(args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def batch_and_int8(args) -> dict:
    """Parts 1 and 2: batched vs one-by-one windows, and (--int8) the int8 decoder, on random states."""
    decoder = tiny_en_decoder(args.random)
    tok = TokenizerConfig.whisper()
    prefix, pad = list(tok.prefix_ids), tok.pad_id
    frames = frames_for_duration(args.seconds)
    gen = torch.Generator().manual_seed(0)
    conds = [torch.randn(frames, 384, generator=gen) for _ in range(args.windows)]
    durations = [args.seconds] * args.windows
    options = DecodingOptions(candidates=args.candidates, steps=args.steps, seq_len=None, seed=0,
                              strategy=args.strategy)
    L = options.canvas_length(args.seconds, len(prefix))
    print(f"tiny.en-sized Whisper-family decoder ({'random' if args.random else 'tiny.en'} weights), "
          f"{args.windows} windows x {args.seconds:g} s ({frames} frames, canvas {L}), K={args.candidates}, "
          f"steps={args.steps}, strategy={args.strategy}, threads={args.threads}", flush=True)
    decode_windows(decoder, conds[:1], options, prefix, pad, durations[:1])  # warm-up

    def one_by_one(model=decoder):
        return [decode_windows(model, [c], options, prefix, pad, [d], seeds=[options.seed + i])[0]
                for i, (c, d) in enumerate(zip(conds, durations))]

    # Interleaved rounds, best of each: a machine shared with other jobs slows all variants alike.
    batches = [b for b in sorted({2, 4, args.windows}) if b <= args.windows]
    variants = {"one by one": one_by_one}
    for b in batches:
        variants[b] = lambda b=b: decode_windows(decoder, conds, options, prefix, pad, durations, max_batch_windows=b)
    best, outs = {k: float("inf") for k in variants}, {}
    for _ in range(args.repeats):
        for key, fn in variants.items():
            t, outs[key] = best_of(fn, 1)
            best[key] = min(best[key], t)
    t_single, single = best["one by one"], outs["one by one"]
    print(f"one window at a time : {t_single:7.2f} s  ({t_single / args.windows * 1000:6.0f} ms/window)", flush=True)
    report = {"windows": args.windows, "seconds": args.seconds, "frames": frames, "canvas": L, "K": args.candidates,
              "steps": args.steps, "threads": args.threads, "one_by_one_s": t_single, "batched": {}}
    for b in batches:
        t, out = best[b], outs[b]
        same = all(torch.equal(x.tokens, y.tokens) and x.selected == y.selected for x, y in zip(out, single))
        print(f"batched, {b:2d} windows  : {t:7.2f} s  speed-up {t_single / t:4.2f}x  identical tokens: {same}",
              flush=True)
        report["batched"][b] = {"s": t, "speedup": t_single / t, "identical": same}

    if args.int8:
        from whisfusion_cli.model import quantize_decoder

        report["int8"] = {}
        for head in (False, True):
            q = quantize_decoder(decoder, head=head)
            one_by_one(q)
            t, out = best_of(lambda: one_by_one(q), args.repeats)
            changed = sum(a.text_tokens != b.text_tokens for a, b in zip(out, single))
            agree = sum(int((a.tokens == b.tokens).sum()) for a, b in zip(out, single)) / sum(
                a.tokens.numel() for a in single)
            label = "int8 linears + head" if head else "int8 linears, fp32 head"
            print(f"{label:23s}: {t:7.2f} s  speed-up {t_single / t:4.2f}x  windows whose chosen text changed: "
                  f"{changed}/{args.windows}, canvas positions equal: {agree:.1%}", flush=True)
            report["int8"]["head" if head else "no_head"] = {"s": t, "speedup": t_single / t, "changed": changed,
                                                             "positions_equal": agree}
    return report


def int8_on_speech(model_dir: str, repeats: int) -> dict:
    """Float vs int8 decoder of a trained model on the real-speech clips (same float encoder states)."""
    from pathlib import Path

    from whisfusion_cli.audio import load_audio
    from whisfusion_cli.bench import corpus_error_rates
    from whisfusion_cli.loading import load_model
    from whisfusion_cli.model import quantize_decoder

    clips_dir = Path(__file__).resolve().parent.parent / "tests" / "data" / "audio"
    items = [json.loads(x) for x in (clips_dir / "realspeech.jsonl").read_text().splitlines() if x.strip()]
    clips = [load_audio(clips_dir / item["audio"]) for item in items]
    refs = [item["text"] for item in items]
    model = load_model(model_dir)
    states = model.encoder.encode(clips)
    tok = model.tokenizer
    options = dataclasses.replace(model.decoding, seed=0)
    durations = [len(c) / 16000 for c in clips]
    print(f"\n{model_dir} on {len(clips)} real clips ({sum(durations):.1f} s), K={options.candidates}, "
          f"{options.steps} steps, {options.strategy}, threads={torch.get_num_threads()}", flush=True)

    def run(decoder):
        return decode_windows(decoder, states, options, tok.prefix_ids, tok.pad_id, durations)

    decoders = {"float32": model.decoder, "int8, fp32 head": quantize_decoder(model.decoder, head=False),
                "int8 + head": quantize_decoder(model.decoder)}
    out = {}
    for name, decoder in decoders.items():
        run(decoder)  # warm-up
        t, results = best_of(lambda: run(decoder), repeats)
        texts = [tok.decode(r.text_tokens) for r in results]
        out[name] = {"s": t, "wer": corpus_error_rates(refs, texts)["wer"],
                     "tokens": [r.text_tokens for r in results]}
    base = out["float32"]
    for name, r in out.items():
        changed = sum(a != b for a, b in zip(r["tokens"], base["tokens"]))
        r["changed"] = changed
        print(f"{name:16s}: decode {r['s']:6.2f} s  speed-up {base['s'] / r['s']:4.2f}x  WER {r['wer']:6.1%}  "
              f"clips whose text changed: {changed}/{len(clips)}", flush=True)
    return {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in out.items()}


def mixed_lengths(repeats: int, batch: int = 8) -> dict:
    """Part 4: the VAD windows of a joined real recording, one at a time vs ragged batches of `batch`."""
    import sys
    import tempfile
    from pathlib import Path

    from whisfusion_cli.audio import stream_audio
    from whisfusion_cli.bench import corpus_error_rates
    from whisfusion_cli.loading import Pipeline
    from whisfusion_cli.transcribe import TranscribeOptions
    from whisfusion_cli.vad import VadOptions, iter_windows

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_e2e import build_recording

    pipe = Pipeline.load(TranscribeOptions(device="cpu", decoding={"seed": 0}))
    with tempfile.TemporaryDirectory() as tmp:
        path, reference, seconds = build_recording(Path(tmp), repeats=4, gap=1.0)
        windows = [(w, a) for w, a in iter_windows(stream_audio(path, 10.0), pipe.vad_options(VadOptions()))
                   if not w.silent]
    states = pipe.encode([a for _, a in windows])
    durations = [w.duration for w, _ in windows]
    canvases = [pipe.decoding.canvas_length(d, len(pipe.prefix_ids)) for d in durations]
    print(f"\n{len(windows)} windows of a {seconds:.0f} s recording, {min(durations):.1f}-{max(durations):.1f} s "
          f"(canvas {min(canvases)}-{max(canvases)}), {pipe.model.name} decoding defaults, "
          f"threads={torch.get_num_threads()}", flush=True)

    def run(max_batch):
        return decode_windows(pipe.model.decoder, states, pipe.decoding, pipe.prefix_ids, pipe.pad_id, durations,
                              seeds=list(range(len(states))), max_batch_windows=max_batch)

    run(batch)  # warm-up
    variants = {"one at a time": 1, f"batches of {batch}": batch}
    best, outs = {k: float("inf") for k in variants}, {}
    for _ in range(repeats):  # interleaved rounds: a noisy machine slows both alike
        for name, b in variants.items():
            t, outs[name] = best_of(lambda b=b: run(b), 1)
            best[name] = min(best[name], t)
    single = outs["one at a time"]
    report = {"windows": len(windows), "audio_s": seconds}
    for name in variants:
        texts = [pipe.text(r) for r in outs[name]]
        changed = sum(a.text_tokens != b.text_tokens for a, b in zip(outs[name], single))
        wer = corpus_error_rates([reference], [" ".join(texts)])["wer"]
        speedup = best["one at a time"] / best[name]
        print(f"{name:16s}: {best[name]:6.2f} s  speed-up {speedup:4.2f}x  WER {wer:6.1%}  windows whose text "
              f"changed: {changed}/{len(windows)}", flush=True)
        report[name] = {"s": best[name], "speedup": speedup, "wer": wer, "changed": changed}
    return report


if __name__ == "__main__":
    main()
