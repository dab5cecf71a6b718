"""Batched windows and the int8 decoder, measured side by side in one run (issue: fast decoding).

1. W windows of S seconds decoded one at a time vs together (decode_windows, one forward per step for the
   whole batch), on a tiny.en-sized Whisper-family decoder (tiny.en's weights via
   train.whisper_decoder_from_pretrained, or --random), random encoder states of the window's frame count,
   the audio-sized canvas, K candidates x steps. Tokens must be identical.
2. --int8: the same decode with the decoder's Linear layers int8 (model.quantize_decoder, with and without
   the tied output projection), one window at a time: time, and how many windows' chosen tokens changed.

    python scripts/bench_batch.py                      # 8 windows of 10 s, K=15, 4 steps, 1 thread
    python scripts/bench_batch.py --int8 --threads 2
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--candidates", type=int, default=15)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--strategy", default="remask", choices=("remask", "confidence"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every timing")
    ap.add_argument("--random", action="store_true", help="random weights instead of tiny.en's")
    ap.add_argument("--int8", action="store_true", help="also time the int8 decoder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
