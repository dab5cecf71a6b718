"""Decode time against transcript length: Whisfusion (fixed and audio-sized canvas) vs Whisper greedy.

For transcripts of about 5..120 tokens (audio of 2..30 s at TOKENS_PER_SECOND), on the same encoder states
(random, with the frame count of that much audio in the encoder's "short"/"pad_trim" modes; the decoders'
cost does not depend on the values), one run times:

* Whisfusion, fixed canvas (upstream: every window gets the same canvas, --canvas tokens): flat;
* Whisfusion, audio-sized canvas (DecodingOptions.seq_len=None): grows slowly with the audio;
* Whisper tiny.en greedy autoregressive decoding with a KV cache (transformers' decoder, the cross-attention
  keys/values computed once), forced to emit exactly n tokens (end-of-text suppressed): grows with n.

The Whisfusion decoder is tiny.en's decoder made bidirectional (train.whisper_decoder_from_pretrained), so
both decoders have the same size. Prints a table with the ratios and saves a plot.

    python scripts/bench_length.py --out results/length.png
    python scripts/bench_length.py --candidates 1 --steps 8 --strategy confidence --out results/length_k1.png
    python scripts/bench_length.py --lengths 5,60,120 --candidates 4 --threads 2   # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from whisfusion_cli.decoding import DecodingOptions, decode_windows
from whisfusion_cli.encoder import frames_for_duration
from whisfusion_cli.fileio import atomic_path, write_atomic
from whisfusion_cli.tokenizer import TokenizerConfig

DEFAULT_LENGTHS = (5, 10, 20, 40, 60, 80, 100, 120)
TOKENS_PER_SECOND = 4.0  # Whisper tokens per second of English speech: 120 tokens ~ a full 30 s window
MIN_SECONDS, MAX_SECONDS = 2.0, 30.0
WIDTH = 384  # tiny.en


def seconds_for(tokens: int) -> float:
    return min(MAX_SECONDS, max(MIN_SECONDS, tokens / TOKENS_PER_SECOND))


@torch.no_grad()
def whisper_greedy(hf, states: torch.Tensor, prefix: list[int], n: int, eot: int) -> list[int]:
    """n tokens of greedy decoding with a KV cache; end-of-text is suppressed so the length is exactly n."""
    decoder, proj = hf.model.decoder, hf.proj_out
    out = decoder(input_ids=torch.tensor([prefix]), encoder_hidden_states=states, use_cache=True)
    tokens = []
    for _ in range(n):
        logits = proj(out.last_hidden_state[:, -1])
        logits[:, eot] = -math.inf
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        out = decoder(input_ids=nxt, encoder_hidden_states=states, past_key_values=out.past_key_values,
                      use_cache=True)
    return tokens


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def save_plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(n, [r["flat_s"] for r in rows], "o-", label=f"Whisfusion, fixed canvas ({rows[0]['flat_canvas']})")
    ax.plot(n, [r["sized_s"] for r in rows], "s-", label="Whisfusion, audio-sized canvas")
    ax.plot(n, [r["whisper_s"] for r in rows], "^-", label="Whisper tiny.en greedy (KV cache)")
    ax.set_xlabel("transcript length (tokens)")
    ax.set_ylabel("decode time per window (s)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="transcript lengths in tokens")
    ap.add_argument("--candidates", type=int, default=15)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--strategy", default="remask", choices=("remask", "confidence"))
    ap.add_argument("--canvas", type=int, default=256, help="the fixed canvas (upstream: 256)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="best of N for every timing")
    ap.add_argument("--out", default="results/length.png", help="plot (PNG); a .json with the numbers beside it")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    torch.set_num_threads(args.threads)

    from whisfusion_cli.whisper_source import load_whisper
    from whisfusion_cli.train import whisper_decoder_from_pretrained

    hf = load_whisper("tiny.en").eval()
    diffusion = whisper_decoder_from_pretrained("tiny.en", WIDTH).eval()
    tok = TokenizerConfig.whisper()
    prefix, eot = list(tok.prefix_ids), tok.pad_id
    if args.canvas < max(lengths) + len(prefix):
        ap.error(f"--canvas {args.canvas} cannot hold {max(lengths)} tokens")
    base = DecodingOptions(candidates=args.candidates, steps=args.steps, seed=0, max_seq_len=args.canvas,
                           strategy=args.strategy)
    flat, sized = (dataclasses.replace(base, seq_len=s) for s in (args.canvas, None))
    title = (f"tiny.en-sized decoders; Whisfusion K={args.candidates}, {args.steps} steps, {args.strategy}; "
             f"{torch.get_num_threads()} CPU thread(s)")
    print(title, flush=True)
    gen = torch.Generator().manual_seed(0)
    # Warm-up: allocator and kernels.
    warm = torch.randn(1, 100, WIDTH, generator=gen)
    whisper_greedy(hf, warm, prefix, 3, eot)
    decode_windows(diffusion, [warm[0]], sized, prefix, eot, [2.0])

    rows = []
    header = (f"{'tokens':>6} {'audio s':>7} {'frames':>6} {'canvas':>6} | {'fixed s':>8} {'sized s':>8} "
              f"{'whisper s':>9} | {'whisper/fixed':>13} {'whisper/sized':>13}")
    print(header + "\n" + "-" * len(header), flush=True)
    for n in lengths:
        seconds = seconds_for(n)
        frames = frames_for_duration(seconds)
        states = torch.randn(1, frames, WIDTH, generator=gen)
        L = sized.canvas_length(seconds, len(prefix))
        t_flat = best_of(lambda: decode_windows(diffusion, [states[0]], flat, prefix, eot, [seconds]), args.repeats)
        t_sized = best_of(lambda: decode_windows(diffusion, [states[0]], sized, prefix, eot, [seconds]), args.repeats)
        t_ar = best_of(lambda: whisper_greedy(hf, states, prefix, n, eot), args.repeats)
        row = {"tokens": n, "seconds": seconds, "frames": frames, "flat_canvas": args.canvas, "sized_canvas": L,
               "flat_s": t_flat, "sized_s": t_sized, "whisper_s": t_ar}
        rows.append(row)
        print(f"{n:6d} {seconds:7.1f} {frames:6d} {L:6d} | {t_flat:8.2f} {t_sized:8.2f} {t_ar:9.2f} | "
              f"{t_ar / t_flat:13.2f} {t_ar / t_sized:13.2f}", flush=True)
    first, last = rows[0], rows[-1]
    print(f"growth from {first['tokens']} to {last['tokens']} tokens: fixed canvas "
          f"{last['flat_s'] / first['flat_s']:.2f}x, sized canvas {last['sized_s'] / first['sized_s']:.2f}x, "
          f"Whisper greedy {last['whisper_s'] / first['whisper_s']:.2f}x")
    out = Path(args.out)
    save_plot(rows, out, title)
    write_atomic(out.with_suffix(".json"), json.dumps({"config": vars(args), "rows": rows}, indent=1))
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
