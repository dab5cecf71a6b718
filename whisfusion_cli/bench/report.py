"""A benchmark's results as the user reads them: two Rich tables, results.json, results.csv,
hypotheses.csv and two plots (WER vs RTFx, latency vs duration). Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ..fileio import atomic_path, write_atomic
from .metrics import BUCKETS
from .options import BenchError

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
HYPOTHESES_CSV = "hypotheses.csv"
PLOT_WER_RTFX = "wer_vs_rtfx.png"
PLOT_LATENCY = "latency_vs_duration.png"
SYSTEM_COLUMN_WIDTH = 36


def json_safe(obj):
    """NaN/inf -> None so the JSON is standard (other tools refuse NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


SUMMARY_FIELDS = (
    ("accuracy", "wer_corpus_whisper_norm"), ("accuracy", "cer_corpus_whisper_norm"),
    ("accuracy", "wer_mean_utterance_paper_norm"), ("accuracy", "ref_words"), ("accuracy", "substitutions"),
    ("accuracy", "deletions"), ("accuracy", "insertions"),
    ("speed", "audio_s"), ("speed", "wall_s"), ("speed", "rtfx"), ("speed", "load_audio_s"), ("speed", "encoder_s"),
    ("speed", "decoder_s"), ("speed", "tokens_per_s_upstream"), ("speed", "tokens_per_s_emitted"),
    ("speed", "positions_per_s"), ("speed", "model_load_s"),
    ("memory", "peak_rss_mb"), ("memory", "peak_rss_added_mb"), ("memory", "cuda_max_allocated_mb"),
)
ENV_FIELDS = ("cpu", "cpu_count", "threads", "device", "dtype")
HYPOTHESIS_FIELDS = ("id", "audio", "duration_s", "bucket", "reference", "hypothesis", "latency_s", "load_audio_s",
                     "encoder_s", "decoder_s", "canvas_tokens", "emitted_tokens", "positions", "wer_paper_norm",
                     "stable_across_repeats")


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _cell(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return v


def write_results(results: dict, out: Path, plots: bool = True) -> None:
    env = results["environment"]
    header = ["system", "spec", "n_utterances"] + [f for _, f in SUMMARY_FIELDS]
    header += [f"latency_median_s[{name}]" for _, _, name in BUCKETS] + [f"env_{f}" for f in ENV_FIELDS]
    header += ["env_gpu", "env_torch", "env_transformers", "env_ctranslate2"]
    rows = []
    for s in results["systems"]:
        row = [s["label"], s["spec"], len(s["utterances"])] + [_cell(s[g][f]) for g, f in SUMMARY_FIELDS]
        row += [_cell(s["latency_buckets"][name]["median_latency_s"]) for _, _, name in BUCKETS]
        row += [_cell(env[f]) for f in ENV_FIELDS]
        row += [(env["gpu"] or {}).get("name", ""), env["versions"]["torch"], env["versions"]["transformers"],
                _cell(env["versions"]["ctranslate2"])]
        rows.append(row)
    hyp_rows = [[s["label"]] + [_cell(u[f]) for f in HYPOTHESIS_FIELDS] for s in results["systems"]
                for u in s["utterances"]]
    write_atomic(out / RESULTS_JSON, json.dumps(json_safe(results), indent=1))
    write_atomic(out / RESULTS_CSV, _csv_text(header, rows))
    write_atomic(out / HYPOTHESES_CSV, _csv_text(("system",) + HYPOTHESIS_FIELDS, hyp_rows))
    if plots:
        write_plots(results, out)


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def _legend_below(ax) -> None:
    """Below the axes, so long system labels never hide a point."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)


def write_plots(results: dict, out: Path) -> None:
    """WER vs RTFx (one point per system, both WER conventions) and latency vs audio duration."""
    try:
        import matplotlib
    except ImportError:
        raise BenchError("plots need matplotlib (pip install 'whisfusion[plots]'), or pass --no-plots") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    systems = results["systems"]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(systems):
        x = s["speed"]["rtfx"]
        corpus = s["accuracy"]["wer_corpus_whisper_norm"]
        paper = s["accuracy"]["wer_mean_utterance_paper_norm"]
        if x is None or not math.isfinite(x):
            continue
        c = colours(i % 10)
        if corpus is not None and math.isfinite(corpus):
            ax.scatter([x], [100 * corpus], color=c, marker="o", s=60, label=s["label"])
        if paper is not None and math.isfinite(paper):
            ax.scatter([x], [100 * paper], facecolors="none", edgecolors=[c], marker="s", s=60)
    ax.set_xscale("log")
    ax.set_xlabel("RTFx (audio s / wall s, audio loading and encoder included; higher is faster)")
    ax.set_ylabel("WER %")
    ax.set_title("Accuracy vs speed  (filled: corpus WER, Whisper norm.; hollow: mean-utterance WER, paper)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    _legend_below(ax)
    _save_figure(fig, out / PLOT_WER_RTFX)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(systems):
        c = colours(i % 10)
        pts = [(u["duration_s"], u["latency_s"]) for u in s["utterances"]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.5, color=c)
        # The line joins the bucket medians: flat means latency independent of duration.
        med = [(b["median_duration_s"], b["median_latency_s"]) for b in s["latency_buckets"].values() if b["n"]]
        ax.plot([p[0] for p in med], [p[1] for p in med], marker="D", ms=6, lw=1.5, color=c, label=s["label"])
    for low, _, _ in BUCKETS[1:]:
        ax.axvline(low, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("audio duration (s)")
    ax.set_ylabel("latency (s, median over repeats)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Latency vs audio duration ({results['environment']['device']}, "
                 f"{results['environment']['threads']} threads)", fontsize=9)
    ax.grid(True, alpha=0.3)
    _legend_below(ax)
    _save_figure(fig, out / PLOT_LATENCY)
    plt.close(fig)


def _fmt(v, spec=".1f", scale=1.0):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v * scale, spec)


def results_tables(results: dict):
    """Two Rich tables: accuracy and speed per system, and median latency per duration bucket."""
    from rich.table import Table

    env = results["environment"]
    title = (f"whisfusion bench: {results['dataset']['n_utterances']} utterances, "
             f"{results['dataset']['audio_s']:.1f} s of audio; {env['device']} {env['dtype']}, "
             f"{env['threads']} threads")
    main = Table(title=title, caption_justify="left", caption="WER/CER corpus: Whisper English normaliser (Open ASR Leaderboard). "
                 "WER mean-utt: mean of per-utterance WERs, lower-case + non-word characters deleted (paper). "
                 "RTFx: audio s / wall s, audio loading and encoder included. tok/s upstream: canvas tokens / "
                 "decoder s (AR: generated tokens); emitted: text tokens / decoder s.")
    main.add_column("system", overflow="fold", max_width=SYSTEM_COLUMN_WIDTH)
    for name in ("WER %\ncorpus", "CER %\ncorpus", "WER %\nmean-utt", "RTFx", "tok/s\nupstream", "tok/s\nemitted",
                 "peak\nMB"):
        main.add_column(name, justify="right", no_wrap=True)
    latency = Table(title="median latency (s) by audio duration (utterances)")
    latency.add_column("system", overflow="fold", max_width=SYSTEM_COLUMN_WIDTH)
    for _, _, name in BUCKETS:
        latency.add_column(name, justify="right", no_wrap=True)
    for s in results["systems"]:
        a, sp, mem = s["accuracy"], s["speed"], s["memory"]
        gpu = mem.get("cuda_max_allocated_mb")
        peak = _fmt(mem["peak_rss_mb"], ".0f") + (f" / {gpu:.0f} GPU" if gpu is not None else "")
        main.add_row(
            s["label"], _fmt(a["wer_corpus_whisper_norm"], ".2f", 100), _fmt(a["cer_corpus_whisper_norm"], ".2f", 100),
            _fmt(a["wer_mean_utterance_paper_norm"], ".2f", 100), _fmt(sp["rtfx"], ".2f"),
            _fmt(sp["tokens_per_s_upstream"], ".0f"), _fmt(sp["tokens_per_s_emitted"], ".0f"), peak,
        )
        cells = []
        for _, _, name in BUCKETS:
            b = s["latency_buckets"][name]
            cells.append(f"{_fmt(b['median_latency_s'], '.2f')} ({b['n']})" if b["n"] else "-")
        latency.add_row(s["label"], *cells)
    return main, latency
