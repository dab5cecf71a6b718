"""Running a benchmark: every system over the same utterances in the same order, measured the same way.

Each utterance is timed from reading its audio file to its final text (audio loading, features, encoder and
decoder all included); the model load is timed apart; warm-up runs are not measured, and with `repeats` > 1
every timing is the median over the repeats. A finished system's results are kept under the output
directory (`.partial/`), so a restarted run with the same settings reuses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .. import first_line
from ..audio import SAMPLE_RATE, AudioError, load_audio
from ..data import DatasetError, Item, dataset_fingerprint, read_dataset
from ..fileio import write_atomic
from .memory import MemoryMeter
from .metrics import BUCKETS, accuracy, bucket_of, utterance_wer_paper
from .options import BenchError, BenchOptions, SystemSpec, default_systems, parse_system
from .report import (HYPOTHESES_CSV, PLOT_LATENCY, PLOT_WER_RTFX, RESULTS_CSV, RESULTS_JSON, json_safe, results_tables,
                     write_results)
from .systems import SYSTEM_CLASSES, Hypothesis, device_dtype
from .verify import verify_results

PARTIAL_DIR = ".partial"  # finished systems of an interrupted run, reused by the next run with the same key
RESULTS_FORMAT = "whisfusion-bench"
RESULTS_VERSION = 1
CHECK_LIMIT = 3  # --check: a few utterances, no warm-up, and the consistency checks of `verify_results`
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
PIPE_WIDTH = 160  # console width when stdout is not a terminal (logs, CI)
CONVENTIONS = {
    "wer_corpus_whisper_norm": "corpus WER (total errors / total reference words) after the Whisper English "
                               "normaliser (whisper_normalizer.english.EnglishTextNormalizer); Open ASR Leaderboard",
    "cer_corpus_whisper_norm": "corpus CER after the same normaliser",
    "wer_mean_utterance_paper_norm": "mean of per-utterance WERs after lower-casing and deleting non-word "
                                     "characters (the Whisfusion paper's number)",
    "rtfx": "audio seconds / wall seconds; wall includes reading the audio, features, encoder and decoder",
    "latency_s": "per utterance, from reading the audio file to the final text (median over repeats)",
    "tokens_per_s_upstream": "upstream's definition: canvas length / decoder seconds (256 per window upstream, "
                             "whatever the candidates and steps); autoregressive systems: generated text tokens",
    "tokens_per_s_emitted": "text tokens in the output / decoder seconds",
    "positions_per_s": "Whisfusion: candidates x canvas x steps positions filled / decoder seconds",
    "peak_rss_mb": "peak resident set size while the system was loaded and run (includes the Python process)",
}


def load_items(options: BenchOptions) -> list[Item]:
    path = options.dataset
    if path is None:
        if not options.check:
            raise BenchError("no dataset given (a LibriSpeech tree, a JSONL/CSV manifest, or a folder of audio "
                             "with .txt transcripts)")
        path = EXAMPLES_DIR
        if not path.is_dir():
            raise BenchError(f"--check without a DATASET uses the bundled example clips, but {path} is missing "
                             f"from this install; pass a dataset")
    try:
        items = read_dataset(path)
    except DatasetError as e:
        raise BenchError(str(e)) from None
    limit = options.limit if options.limit is not None else (CHECK_LIMIT if options.check else None)
    return items[:limit] if limit else items


def read_item_audio(item: Item) -> np.ndarray:
    try:
        audio = load_audio(item.audio)
    except AudioError as e:
        raise BenchError(str(e)) from None
    if item.start is not None or item.end is not None:
        a = int(round((item.start or 0.0) * SAMPLE_RATE))
        b = len(audio) if item.end is None else int(round(item.end * SAMPLE_RATE))
        audio = audio[a:b]
        if len(audio) == 0:
            raise BenchError(f"{item.audio}: item {item.id} selects no audio ({item.start}-{item.end} s)")
    return audio


def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def run_system(spec: SystemSpec, items: list[Item], options: BenchOptions, progress=None) -> dict[str, Any]:
    """Load one system, warm it up, run every item `repeats` times; hypotheses, medians and aggregates."""
    meter = MemoryMeter(options.device)
    meter.start()
    t0 = time.perf_counter()
    try:
        system = SYSTEM_CLASSES[spec.kind](spec, options)
    except BenchError:
        raise
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # CheckpointError, HubError, WhisperLoadError...
        raise BenchError(f"system {spec.text!r}: {first_line(e)}") from None
    load_s = time.perf_counter() - t0
    import torch

    # A model directory's encoder spec may carry its own thread count: every system runs with --threads.
    torch.set_num_threads(options.threads)
    try:
        for _ in range(options.warmup if items else 0):
            system.transcribe(read_item_audio(items[0]))
        runs: list[list[tuple[float, float, float, Hypothesis]]] = []  # (duration, load s, latency s, output)
        task = progress.add_task(spec.label, total=len(items) * options.repeats) if progress else None
        for _ in range(options.repeats):
            run = []
            for item in items:
                t_start = time.perf_counter()
                audio = read_item_audio(item)
                t_loaded = time.perf_counter()
                hyp = system.transcribe(audio)
                t_end = time.perf_counter()
                run.append((len(audio) / SAMPLE_RATE, t_loaded - t_start, t_end - t_start, hyp))
                if progress:
                    progress.advance(task)
            runs.append(run)
        memory = meter.stop()
        info = dict(system.info, torch_threads=torch.get_num_threads())
    finally:
        del system
        gc.collect()
    return summarise(spec, items, runs, load_s, memory, info)


def summarise(spec: SystemSpec, items: list[Item], runs, load_s: float, memory: dict, info: dict) -> dict[str, Any]:
    utts = []
    for i, item in enumerate(items):
        per = [run[i] for run in runs]
        duration, _, _, hyp = per[0]
        texts = {p[3].text for p in per}
        utts.append({
            "id": item.id,
            "audio": item.audio,
            "start": item.start,
            "end": item.end,
            "duration_s": duration,
            "bucket": bucket_of(duration),
            "reference": item.text,
            "hypothesis": hyp.text,
            "stable_across_repeats": len(texts) == 1,
            "latency_s": _median(p[2] for p in per),
            "load_audio_s": _median(p[1] for p in per),
            "encoder_s": _median(p[3].encoder_s for p in per),
            "decoder_s": _median(p[3].decoder_s for p in per),
            "canvas_tokens": hyp.canvas_tokens,
            "emitted_tokens": hyp.emitted_tokens,
            "positions": hyp.positions,
            "wer_paper_norm": utterance_wer_paper(item.text, hyp.text),
        })
    audio_s = sum(u["duration_s"] for u in utts)
    wall_per_repeat = [sum(r[2] for r in run) for run in runs]
    wall_s = float(statistics.median(wall_per_repeat))
    dec = [u for u in utts if u["decoder_s"] is not None]
    decoder_s = sum(u["decoder_s"] for u in dec)
    speed = {
        "audio_s": audio_s,
        "wall_s": wall_s,
        "wall_s_per_repeat": wall_per_repeat,
        "rtfx": audio_s / wall_s if wall_s > 0 else math.nan,
        "rtfx_per_repeat": [audio_s / w if w > 0 else math.nan for w in wall_per_repeat],
        "load_audio_s": sum(u["load_audio_s"] for u in utts),
        "encoder_s": sum(u["encoder_s"] or 0.0 for u in utts),
        "decoder_s": decoder_s,
        "tokens_per_s_upstream": sum(u["canvas_tokens"] for u in dec) / decoder_s if decoder_s > 0 else math.nan,
        "tokens_per_s_emitted": sum(u["emitted_tokens"] for u in dec) / decoder_s if decoder_s > 0 else math.nan,
        "positions_per_s": sum(u["positions"] for u in dec) / decoder_s if decoder_s > 0 else math.nan,
        "model_load_s": load_s,
    }
    buckets = {}
    for _, _, name in BUCKETS:
        lat = [u["latency_s"] for u in utts if u["bucket"] == name]
        dur = [u["duration_s"] for u in utts if u["bucket"] == name]
        buckets[name] = {
            "n": len(lat),
            "median_latency_s": _median(lat),
            "mean_latency_s": float(sum(lat) / len(lat)) if lat else None,
            "median_duration_s": _median(dur),
        }
    return {
        "label": spec.label,
        "spec": spec.text,
        "kind": spec.kind,
        "model": spec.model,
        "settings": info,
        "accuracy": accuracy([u["reference"] for u in utts], [u["hypothesis"] for u in utts]),
        "speed": speed,
        "latency_buckets": buckets,
        "memory": memory,
        "utterances": utts,
    }


def environment(options: BenchOptions) -> dict[str, Any]:
    from importlib import metadata

    import torch

    from .. import __version__

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = None
    if options.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(options.device))
        gpu = {"name": props.name, "memory_gb": props.total_memory / 2**30, "cuda": torch.version.cuda}
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": options.threads,
        "torch_threads": torch.get_num_threads(),
        "device": options.device,
        "dtype": options.dtype,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("whisfusion", "torch", "transformers", "ctranslate2",
                                                     "faster-whisper", "jiwer", "whisper-normalizer", "numpy")},
        "whisfusion_version": __version__,
    }


def _partial_key(spec: SystemSpec, fingerprint: str, options: BenchOptions, env: dict) -> str:
    stable_env = {k: env[k] for k in ("cpu", "threads", "device", "dtype", "gpu", "versions")}
    # A model directory retrained in place must not be mistaken for the one measured before.
    model_files = []
    path = Path(spec.model).expanduser()
    if spec.kind == "whisfusion" and spec.model == "default":
        from ..loading import DEFAULT_MODEL_DIR

        path = DEFAULT_MODEL_DIR
    if path.is_dir():
        model_files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    blob = json.dumps([spec.text, fingerprint, options.warmup, options.repeats, stable_env, model_files],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_bench(options: BenchOptions, console=None) -> dict[str, Any]:
    """Run every system over the dataset; write results.json/.csv, hypotheses.csv and plots to output_dir."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True, quiet=options.quiet)
    if options.plots and not _have_matplotlib():  # said before any system runs, not after minutes of them
        console.print("note: no plots: matplotlib is not installed (pip install 'whisfusion[plots]')",
                      markup=False, highlight=False)
        options = dataclasses.replace(options, plots=False)
    specs = [parse_system(s) for s in (options.systems or default_systems())]
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise BenchError(f"systems {', '.join(dupes)} are given twice; add label=NAME to tell them apart")
    items = load_items(options)
    torch.set_num_threads(options.threads)
    device, dtype = device_dtype(options)
    # Resolved once, so every system and the recorded environment see the same concrete device and dtype.
    options = dataclasses.replace(options, device=str(device), dtype=str(dtype).replace("torch.", ""))
    out = Path(options.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"{out}: cannot create the output directory ({e.strerror})") from None
    env = environment(options)
    fingerprint = dataset_fingerprint(items)
    partial = out / PARTIAL_DIR
    systems = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=options.quiet) as progress:
        for spec in specs:
            key = _partial_key(spec, fingerprint, options, env)
            cached = partial / f"{key}.json"
            if options.resume and cached.is_file():
                try:
                    systems.append(json.loads(cached.read_text()))
                    console.print(f"{spec.label}: reusing finished results from {cached}")
                    continue
                except (OSError, json.JSONDecodeError):
                    pass  # a damaged partial file is simply recomputed
            with _quiet_libraries():
                result = run_system(spec, items, options, progress)
            partial.mkdir(exist_ok=True)
            write_atomic(cached, json.dumps(json_safe(result)))
            systems.append(result)
    results = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "dataset": {"path": str(options.dataset or EXAMPLES_DIR), "n_utterances": len(items),
                    "audio_s": systems[0]["speed"]["audio_s"] if systems else 0.0, "fingerprint": fingerprint},
        "options": {k: v for k, v in asdict(options).items() if k not in ("quiet",)},
        "conventions": CONVENTIONS,
        "systems": systems,
    }
    write_results(results, out, plots=options.plots)
    if options.check:
        verify_results(out, plots=options.plots)
    return results


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_libraries():
    """Library warnings (transformers' deprecations, torch's notes) stay off the user's terminal while the
    systems run: they say nothing about the measurement, and the table is what the user asked for."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    level = hf_logging.get_verbosity() if hf_logging else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hf_logging:
            hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            if hf_logging:
                hf_logging.set_verbosity(level)


def bench_main(**kwargs) -> dict:
    """CLI entry: keyword arguments are BenchOptions fields (None means the default). Prints the table and
    where the files went; BenchError (one line) for bad input or a failed check."""
    from rich.console import Console

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "systems" in kwargs:
        kwargs["systems"] = list(kwargs["systems"])
    options = BenchOptions(**kwargs)
    results = run_bench(options)
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    if not options.quiet:
        for table in results_tables(results):
            console.print(table)
        out = Path(options.output_dir)
        plotted = results["options"]["plots"]  # False where matplotlib is missing
        files = [RESULTS_JSON, RESULTS_CSV, HYPOTHESES_CSV] + ([PLOT_WER_RTFX, PLOT_LATENCY] if plotted else [])
        console.print(f"results in {out}/: {', '.join(files)}")
        if options.check:
            console.print(f"check passed: {len(results['systems'])} systems consistent")
    return results
