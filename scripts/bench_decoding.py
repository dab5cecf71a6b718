"""Decoder speed, measured side by side in one run (issue: fast decoding).

1. Exact mode vs upstream's loop (`_generate_with_timing`, whisfusion_cli.upstream through its
   ReferenceForward: the condition expanded to K rows, a full forward with cross-attention keys/values
   recomputed at every step, logits for every position), on the 170M preset with random weights, K=15,
   4 steps, one 30 s window, canvas 256. Same masks for both; tokens must be identical. Prints both times and the ratio.
2. Peak memory per window for K = 1, 4, 15 (fast exact mode, 170M preset).
3. Optionally (--memory) peak memory per window for K = 1, 4, 15.
4. Optionally (--windows N) decode_windows on N windows of 3-30 s in one batch with the embedded model's
   decoding options (confidence strategy, K = 1, 8 steps, shortlist, pad context, refine) and with a sampled
   variant (K = 4, temperature 0.5): what `whisfusion transcribe` runs, random weights.
Every time is the median of --repeat runs (a busy machine: compare medians, or ratios within one sitting;
--cpu-time with --threads 1 counts the process's own CPU seconds, which other load barely changes).

    python scripts/bench_decoding.py                       # full size (minutes on 2 CPU cores)
    python scripts/bench_decoding.py --frames 300 --canvas 64 --layers 4   # quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from whisfusion_cli.decoding import DecodingOptions, decode_traced, decode_windows, parallel_diffusion_decode
from whisfusion_cli.model import PRESETS, DiffusionDecoder, ModelConfig
from whisfusion_cli.upstream import Trace


def upstream_loop(model, condition, masks, steps, pad_id=2, bos_id=1):
    """What upstream does (upstream.remask through upstream.ReferenceForward: the condition expanded to K, a
    full forward per step) -> (tokens, confidences, selected candidate)."""
    K, L = masks[0].shape
    options = DecodingOptions(candidates=K, steps=steps, seq_len=L)
    out = decode_traced(model, condition, options, Trace(masks=masks, reference=True), [bos_id], pad_id)
    return out.tokens, out.confidences, out.selected


CLOCK = {"clock": time.perf_counter}  # --cpu-time: time.process_time


def timed(fn, repeat: int):
    """(fn's last result, median seconds over `repeat` runs)."""
    times = []
    for _ in range(repeat):
        t0 = CLOCK["clock"]()
        out = fn()
        times.append(CLOCK["clock"]() - t0)
    return out, statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=15)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--frames", type=int, default=1500, help="encoder frames of the window (1500 = 30 s)")
    ap.add_argument("--layers", type=int, default=None, help="override n_layer (quick runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory for K = 1, 4, 15")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the median is reported")
    ap.add_argument("--windows", type=int, default=0, help="also time decode_windows on this many windows")
    ap.add_argument("--skip-exact", action="store_true", help="skip the exact-vs-upstream comparison")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the process's CPU seconds, not wall seconds (a busy machine; with --threads 1)")
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args(argv)
    if args.cpu_time:
        CLOCK["clock"] = time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = PRESETS["Diff_LLaMA_170M"]
    if args.layers:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "n_layer": args.layers})
    model = DiffusionDecoder(cfg).eval()
    condition = torch.randn(1, args.frames, cfg.n_embd)
    gen = torch.Generator().manual_seed(args.seed)
    options = DecodingOptions(candidates=args.candidates, steps=args.steps, seq_len=args.canvas)
    masks = []
    for s in range(args.steps):
        m = torch.rand(args.candidates, args.canvas, generator=gen) < options.ratio(s)
        m[:, 0] = False
        masks.append(m)

    report = {"config": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "K": args.candidates, "steps": args.steps,
                         "canvas": args.canvas, "frames": args.frames, "threads": args.threads}}
    print(f"170M preset ({cfg.n_layer} layers), K={args.candidates}, steps={args.steps}, canvas={args.canvas}, "
          f"frames={args.frames}, threads={args.threads}", flush=True)

    # Warm-up (allocator, kernels) on a tiny call, then each variant once, interleaved order fixed.
    parallel_diffusion_decode(model, condition[:, :16], DecodingOptions(candidates=2, steps=1, seq_len=8))
    same = True
    if not args.skip_exact:
        same = _exact_vs_upstream(model, condition, options, masks, args, report)
    if args.windows:
        report["windows"] = _windows(model, cfg, args)

    if args.memory:
        import subprocess

        mem = {}
        for K in (1, 4, 15):
            cmd = [sys.executable, __file__, "--_memory-child", str(K), str(args.canvas), str(args.frames),
                   str(args.layers or 0), str(args.steps)]
            mem[K] = float(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])
            print(f"peak memory per window, K={K:2d}: {mem[K]:8.1f} MB above the loaded model")
        report["peak_rss_mb"] = mem
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if not same:
        sys.exit(1)


def _exact_vs_upstream(model, condition, options, masks, args, report) -> bool:
    (ref_tokens, ref_conf, ref_sel), t_ref = timed(lambda: upstream_loop(model, condition, masks, args.steps),
                                                   args.repeat)
    print(f"upstream loop (reference): {t_ref:8.2f} s", flush=True)
    out, t_fast = timed(lambda: decode_traced(model, condition, options, Trace(masks=masks)), args.repeat)
    print(f"whisfusion exact mode   : {t_fast:8.2f} s", flush=True)
    same = torch.equal(out.tokens, ref_tokens) and out.selected == ref_sel
    max_conf = (out.confidences - ref_conf).abs().max().item()
    print(f"identical tokens and selection: {same}  (max |confidence diff| {max_conf:.2e})")
    print(f"speed-up exact vs upstream loop: {t_ref / t_fast:.2f}x")
    report.update(upstream_s=t_ref, exact_s=t_fast, speedup=t_ref / t_fast, identical=same, max_conf_diff=max_conf)
    return same


# The embedded model's decoding options (whisfusion_cli/assets/default/config.json), and a sampled variant.
WINDOW_OPTIONS = {
    "default": dict(candidates=1, steps=8, seq_len=None, max_seq_len=128, strategy="confidence",
                    repeat_penalty=0.5, refine=4, shortlist=16, pad_context=5, seed=0),
    "sampled": dict(candidates=4, steps=8, seq_len=None, max_seq_len=128, strategy="confidence",
                    temperature=0.5, repeat_penalty=0.5, shortlist=16, pad_context=5, seed=0),
}


def _windows(model, cfg, args) -> dict:
    """decode_windows on args.windows windows of 3-30 s in one batch, per WINDOW_OPTIONS entry."""
    g = torch.Generator().manual_seed(args.seed)
    seconds = [3.0 + 27.0 * i / max(1, args.windows - 1) for i in range(args.windows)]
    conds = [torch.randn(max(16, int(s * args.frames / 30)), cfg.n_embd, generator=g) for s in seconds]
    out = {}
    for name, fields in WINDOW_OPTIONS.items():
        options = DecodingOptions(**fields)
        _, t = timed(lambda: decode_windows(model, conds, options, [1], 2, seconds, max_batch_windows=len(conds)),
                     args.repeat)
        print(f"decode_windows, {args.windows} windows, {name:8s}: {t:8.3f} s", flush=True)
        out[name] = t
    return out


def _rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _memory_child(K, canvas, frames, layers, steps):
    """Peak resident memory added by decoding one window, above the loaded model: the high-water mark is
    reset (/proc/self/clear_refs) after the model and the condition exist."""
    import gc

    cfg = PRESETS["Diff_LLaMA_170M"]
    if layers:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "n_layer": layers})
    model = DiffusionDecoder(cfg).eval()
    cond = torch.randn(1, frames, cfg.n_embd)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_mb("VmRSS")
    parallel_diffusion_decode(model, cond, DecodingOptions(candidates=K, steps=steps, seq_len=canvas, seed=0))
    print(_rss_mb("VmHWM") - base)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_memory-child":
        _memory_child(*map(int, sys.argv[2:7]))
    else:
        main()
