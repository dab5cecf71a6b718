"""GPU acceptance: everything a GPU run must show, in one process, one JSON (issue 19).

    scripts/gpu_acceptance.sh            # the wrapper: a time limit, results/gpu/acceptance-<host>-<date>.json
    python scripts/gpu_acceptance.py --out results/gpu/x.json [--device cuda:0] [--quick]

Sections, each recorded with "ok" and what it measured (a failing section is recorded, the others still run):
parity (float32 vs tests/data/decoder_parity; bf16/fp16 within PARITY_HALF_TOL), upstream_loop (exact loop vs
upstream's, 170M preset, K=15, 4 steps, 30 s window: identical tokens, speed ratio), throughput (tokens/s as
upstream counts them, K x canvas x steps, and emitted text tokens/s at 1, 8, 32 windows per batch; and seconds
per step with the embedded model's decoding options, whose loop reads the GPU once per step),
attention (flash-attn varlen vs SDPA on ragged batches), transcription (the bundled clips on the GPU against
float32 on the CPU, within one word), train_resume (preprocess on the GPU, then a one-GPU torchrun train with
a resume), memory (peak GPU memory per 30 s window for K = 1, 4, 15). Without a GPU: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

PARITY_FLOAT_TOL = 1e-4  # the CPU parity test's tolerance (tests/test_model_parity.py)
# 16-bit logits of the parity decoder: max |error| at most this share of the largest logit.
PARITY_HALF_TOL = 0.05
UPSTREAM_CLAIM_TOKENS_S = 3180  # upstream's reported throughput (170M, K=15, 4 steps)
BATCH_SIZES = (1, 8, 32)
MEMORY_K = (1, 4, 15)
WORD_SLACK = 1  # transcripts on the GPU may differ from float32 on the CPU by this many words per clip
NO_GPU_EXIT = 2


def _timed(fn, device, repeats=1):
    """(result, seconds per call) with the device synchronised around the calls, after one warm-up call."""
    from whisfusion_cli.distributed import synchronize

    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    synchronize(device)
    return out, (time.perf_counter() - t0) / repeats


def _decoder_170m(device, dtype):
    from whisfusion_cli.model import PRESETS, DiffusionDecoder

    torch.manual_seed(0)
    return DiffusionDecoder(PRESETS["Diff_LLaMA_170M"]).eval().to(device, dtype)


def parity(device) -> dict:
    from whisfusion_cli.checkpoint import load_decoder
    from whisfusion_cli.decoding import DecodingOptions, decode_traced
    from whisfusion_cli.upstream import Trace

    folder = REPO / "tests" / "data" / "decoder_parity"
    io = torch.load(folder / "io.pt", weights_only=True)
    pdd = torch.load(folder / "pdd.pt", weights_only=True)
    out = {"float_tol": PARITY_FLOAT_TOL, "half_tol": PARITY_HALF_TOL}
    ref = io["logits"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dec = load_decoder(folder / "weights.safetensors", config=folder / "config.json", dtype=dtype, device=device)
        with torch.no_grad():
            logits = dec(io["idx"].to(device), condition=io["condition"].to(device)).float().cpu()
        err = float((logits - ref).abs().max())
        agree = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        name = str(dtype).replace("torch.", "")
        if dtype == torch.float32:
            options = DecodingOptions(candidates=pdd["K"], steps=pdd["steps"], seq_len=pdd["seq_len"],
                                      schedule=tuple(pdd["mask_ratio_schedule"]))
            result = decode_traced(dec, io["condition"][0:1].to(device), options, Trace(masks=list(pdd["masks"])),
                                   prefix_ids=[pdd["bos_id"]], pad_id=pdd["pad_id"])
            same = torch.equal(result.tokens, pdd["final_tokens"]) and result.selected == pdd["selected_index"]
            out[name] = {"max_abs_err": err, "argmax_agree": agree, "pdd_identical": same,
                         "ok": err <= PARITY_FLOAT_TOL and same}
        else:
            scale = float(ref.abs().max())
            # argmax agreement is recorded, not required: the fixture's logits lie close together (random weights)
            out[name] = {"max_abs_err": err, "relative_err": err / scale, "argmax_agree": agree,
                         "ok": err <= PARITY_HALF_TOL * scale}
    out["ok"] = all(out[k]["ok"] for k in ("float32", "bfloat16", "float16"))
    return out


def upstream_loop(device, quick=False) -> dict:
    from bench_decoding import upstream_loop as reference
    from whisfusion_cli.decoding import DecodingOptions, decode_traced
    from whisfusion_cli.upstream import Trace

    K, steps, L, frames = 15, 4, 256, 1500
    model = _decoder_170m(device, torch.float32)
    condition = torch.randn(1, frames, model.config.n_embd, generator=torch.Generator().manual_seed(1)).to(device)
    options = DecodingOptions(candidates=K, steps=steps, seq_len=L)
    gen = torch.Generator().manual_seed(0)
    masks = []
    for s in range(steps):
        m = torch.rand(K, L, generator=gen) < options.ratio(s)
        m[:, 0] = False
        masks.append(m)
    repeats = 1 if quick else 5
    (ref_tokens, _, ref_sel), t_ref = _timed(lambda: reference(model, condition, masks, steps), device, repeats)
    out, t_fast = _timed(lambda: decode_traced(model, condition, options, Trace(masks=masks)), device, repeats)
    same = torch.equal(out.tokens, ref_tokens.cpu()) and out.selected == ref_sel
    # Random weights put many logits close together: a differing position is a float-rounding tie unless many.
    differing = int((out.tokens != ref_tokens.cpu()).sum())
    return {"K": K, "steps": steps, "canvas": L, "frames": frames, "upstream_s": t_ref, "exact_s": t_fast,
            "speedup": t_ref / t_fast, "identical": same, "differing_positions": differing, "ok": same}


def _windows(n, device, dim, ragged=False):
    """n random encoder-state windows (30 s, or 3-30 s when ragged) and their durations."""
    g = torch.Generator().manual_seed(2)
    seconds = [3.0 + 27.0 * i / max(n - 1, 1) for i in range(n)] if ragged else [30.0] * n
    conds = [torch.randn(min(1500, int(s * 50) + 10), dim, generator=g).to(device) for s in seconds]
    return conds, seconds


def throughput(device, dtype, quick=False) -> dict:
    from whisfusion_cli.decoding import DecodingOptions, decode_windows

    model = _decoder_170m(device, dtype)
    options = DecodingOptions(seed=0)  # upstream's: K=15, 4 steps, canvas 256
    conds, seconds = _windows(max(BATCH_SIZES), device, model.config.n_embd)
    rows = {}
    for batch in BATCH_SIZES:
        n = batch if quick else max(batch, 8)
        results, t = _timed(lambda: decode_windows(model, conds[:n], options, [1], 2, seconds[:n],
                                                   max_batch_windows=batch), device)
        canvas = sum(r.n_canvas_tokens for r in results)
        emitted = sum(len(r.text_tokens) for r in results)
        rows[str(batch)] = {"windows": n, "seconds": t, "tokens_per_s_upstream": canvas / t,
                            "emitted_tokens_per_s": emitted / t, "windows_per_s": n / t}
    best = max(r["tokens_per_s_upstream"] for r in rows.values())
    return {"dtype": str(dtype).replace("torch.", ""), "weights": "random (170M preset)", "per_batch": rows,
            "confidence_per_batch": confidence_steps(model, device, BATCH_SIZES),
            "upstream_claim_tokens_per_s": UPSTREAM_CLAIM_TOKENS_S, "best_vs_claim": best / UPSTREAM_CLAIM_TOKENS_S,
            "ok": True}


def confidence_steps(model, device, batch_sizes) -> dict:
    """Seconds per step and per window-step of decode_windows with the embedded model's decoding options
    (confidence strategy: its loop reads the GPU once per step, whatever the batch) on ragged 3-30 s windows,
    one batch of each size."""
    from whisfusion_cli.decoding import DecodingOptions, decode_windows
    from whisfusion_cli.checkpoint import CONFIG_FILE
    from whisfusion_cli.loading import DEFAULT_MODEL_DIR

    config = json.loads((DEFAULT_MODEL_DIR / CONFIG_FILE).read_text())["decoding"]
    options = DecodingOptions.from_config(config)
    conds, seconds = _windows(max(batch_sizes), device, model.config.n_embd, ragged=True)
    rows = {}
    for n in batch_sizes:
        _, t = _timed(lambda: decode_windows(model, conds[:n], options, [1], 2, seconds[:n], max_batch_windows=n),
                      device)
        rows[str(n)] = {"seconds": t, "seconds_per_step": t / options.steps,
                        "seconds_per_window_step": t / (options.steps * n)}
    return rows


def attention(device, dtype, quick=False) -> dict:
    from whisfusion_cli import attention as A
    from whisfusion_cli.decoding import DecodingOptions, decode_windows

    if A.flash_varlen_kernel() is None:
        return {"flash_attn": False, "ok": True, "note": "flash-attn not installed: SDPA only"}
    model = _decoder_170m(device, dtype)
    options = DecodingOptions(seed=0, seq_len=None, strategy="confidence", candidates=4, steps=8)
    conds, seconds = _windows(8 if quick else 32, device, model.config.n_embd, ragged=True)
    timings, tokens = {}, {}
    try:
        for name in ("sdpa", "varlen"):
            A.use_backend(name)
            results, timings[name] = _timed(lambda: decode_windows(model, conds, options, [1], 2, seconds,
                                                                   max_batch_windows=len(conds)), device)
            tokens[name] = [r.text_tokens for r in results]
    finally:
        A.use_backend(A.DEFAULT_BACKEND)
    agree = sum(a == b for a, b in zip(tokens["sdpa"], tokens["varlen"])) / len(conds)
    return {"flash_attn": True, "windows": len(conds), "sdpa_s": timings["sdpa"], "varlen_s": timings["varlen"],
            "varlen_speedup": timings["sdpa"] / timings["varlen"], "same_tokens_share": agree,
            "faster": "varlen" if timings["varlen"] < timings["sdpa"] else "sdpa", "ok": agree >= 0.9}


def _word_distance(a: str, b: str) -> int:
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a.split(), b.split())


def transcription(device) -> dict:
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe

    clips = sorted(p for p in (REPO / "tests" / "data" / "audio").iterdir() if p.suffix in (".flac", ".wav"))
    runs = {}
    for name, opts in (("cpu_float32", TranscribeOptions(device="cpu", dtype="float32", int8=False,
                                                         decoding={"seed": 0})),
                       ("gpu", TranscribeOptions(device=str(device), decoding={"seed": 0}))):
        t0 = time.perf_counter()
        results = list(transcribe(clips, opts))
        runs[name] = {"seconds": time.perf_counter() - t0, "texts": [r.text for r in results],
                      "status": [r.status for r in results]}
    distances = [_word_distance(a, b) for a, b in zip(runs["cpu_float32"]["texts"], runs["gpu"]["texts"])]
    return {"clips": [c.name for c in clips], "word_distance": distances, "max_word_distance": max(distances),
            "cpu_s": runs["cpu_float32"]["seconds"], "gpu_s": runs["gpu"]["seconds"],
            "gpu_status": runs["gpu"]["status"],
            "ok": max(distances) <= WORD_SLACK and all(s == "ok" for s in runs["gpu"]["status"])}


def _cli(args, env=None, torchrun=False, timeout=240):
    launcher = [sys.executable, "-m"]
    if torchrun:
        launcher += ["torch.distributed.run", "--nproc_per_node", "1", "--master_port", "0", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", "localhost:0", "-m"]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    r = subprocess.run([*launcher, "whisfusion_cli.cli", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, (r.stdout + r.stderr)[-1500:]


def train_resume(device) -> dict:
    manifest = REPO / "tests" / "data" / "audio" / "realspeech.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        shards, run = Path(tmp) / "shards", Path(tmp) / "run"
        rc, log = _cli(["preprocess", str(manifest), "-o", str(shards), "--device", str(device), "-q"])
        if rc:
            return {"ok": False, "stage": "preprocess", "log": log}
        common = ["train", "--data", str(shards), "-o", str(run), "--init", "tiny.en", "--max-steps", "6",
                  "--batch-size", "4", "--val-items", "2", "--wer-items", "2", "--eval-every", "3", "--log-every", "1",
                  "--device", str(device), "-q"]
        rc1, log1 = _cli([*common, "--stop-at", "3"], torchrun=True)
        rc2, log2 = _cli([*common, "--resume"], torchrun=True)
        ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=False) if (run / "last.pt").exists() else {}
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if rc1 == 0 else []
        events = [m.get("event") for m in metrics if m.get("event")]
        return {"first_rc": rc1, "resume_rc": rc2, "step": ckpt.get("step"), "events": events,
                "devices": sorted({m["device"] for m in metrics if "device" in m}),
                "log": (log1 + log2)[-800:] if rc1 or rc2 else "",
                "ok": rc1 == 0 and rc2 == 0 and ckpt.get("step") == 6 and "resume" in events}


def memory(device, dtype) -> dict:
    from whisfusion_cli.decoding import DecodingOptions, parallel_diffusion_decode

    model = _decoder_170m(device, dtype)
    cond = torch.randn(1, 1500, model.config.n_embd).to(device, dtype)
    base = torch.cuda.memory_allocated(device)
    peaks = {}
    for K in MEMORY_K:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        parallel_diffusion_decode(model, cond, DecodingOptions(candidates=K, seed=0, seq_len=256))
        torch.cuda.synchronize(device)
        peaks[str(K)] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {"dtype": str(dtype).replace("torch.", ""), "peak_mb_above_model": peaks,
            "model_mb": base / 2**20, "ok": True}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where to write the JSON (also printed)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and windows (a smoke run)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA GPU is available to torch on this machine; nothing was run", file=sys.stderr)
        return NO_GPU_EXIT
    from whisfusion_cli.distributed import half_dtype, rank_device

    device = rank_device(args.device)
    half = half_dtype(device)
    props = torch.cuda.get_device_properties(device)
    report = {"gpu": props.name, "capability": list(torch.cuda.get_device_capability(device)),
              "memory_gb": round(props.total_memory / 2**30, 1), "torch": torch.__version__, "cuda": torch.version.cuda,
              "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sections": {}}
    sections = {
        "parity": lambda: parity(device),
        "upstream_loop": lambda: upstream_loop(device, args.quick),
        "throughput": lambda: throughput(device, half, args.quick),
        "attention": lambda: attention(device, half, args.quick),
        "memory": lambda: memory(device, half),
        "transcription": lambda: transcription(device),
        "train_resume": lambda: train_resume(device),
    }
    chosen = args.only.split(",") if args.only else list(sections)
    for name in chosen:
        t0 = time.perf_counter()
        try:
            result = sections[name]()
        except Exception as e:  # recorded; the other sections still run
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        report["sections"][name] = result
        print(f"gpu_acceptance: {name}: {'ok' if result.get('ok') else 'FAILED'} ({result['wall_s']} s)",
              file=sys.stderr, flush=True)
    report["ok"] = all(s.get("ok") for s in report["sections"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
