"""`whisfusion bench --check`: re-read the written results and check them against themselves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .metrics import accuracy, bucket_of
from .options import BenchError
from .report import HYPOTHESES_CSV, PLOT_LATENCY, PLOT_WER_RTFX, RESULTS_CSV, RESULTS_JSON, json_safe

CHECK_TOLERANCE = 1e-9
# A Whisper baseline above this WER on clean test clips means a broken pipeline (wrong features, tokens).
CHECK_MAX_BASELINE_WER = 0.5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Inconsistent(Exception):
    """One check that failed; verify_results says in which file."""


def verify_results(out: Path, plots: bool = True) -> list[str]:
    """Re-read the written results and check them against themselves; BenchError on the first problem.

    Accuracy is recomputed from the saved references and hypotheses, speed aggregates from the saved
    per-utterance timings, the CSV files against the JSON, and the plots must be PNG files."""
    out = Path(out)
    try:
        results = json.loads((out / RESULTS_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"{out / RESULTS_JSON}: unreadable ({e})") from None
    try:
        n = results["dataset"]["n_utterances"]
        if n < 1 or not results["systems"]:
            raise _Inconsistent("no utterances or no systems")
        with open(out / RESULTS_CSV, newline="") as f:
            summary = {row["system"]: row for row in csv.DictReader(f)}
        with open(out / HYPOTHESES_CSV, newline="") as f:
            hyp_rows = list(csv.DictReader(f))
        if len(hyp_rows) != n * len(results["systems"]):
            raise _Inconsistent(f"{HYPOTHESES_CSV} has {len(hyp_rows)} rows, expected {n * len(results['systems'])}")
        for s in results["systems"]:
            _check_accuracy(s, n)
            _check_speed(s, n)
            _check_files(s, summary.get(s["label"]), [r for r in hyp_rows if r["system"] == s["label"]])
        for plot in (PLOT_WER_RTFX, PLOT_LATENCY) if plots else ():
            p = out / plot
            if not p.is_file() or p.read_bytes()[:8] != PNG_MAGIC:
                raise _Inconsistent(f"{plot} is missing or not a PNG file")
    except _Inconsistent as e:
        raise BenchError(f"{out / RESULTS_JSON}: check failed: {e}") from None
    return [s["label"] for s in results["systems"]]


def _close(a, b, tol=CHECK_TOLERANCE) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _check_accuracy(s: dict, n: int) -> None:
    """The system's accuracy is what its saved hypotheses give; a Whisper baseline's is plausible."""
    name, utts = s["label"], s["utterances"]
    if len(utts) != n:
        raise _Inconsistent(f"{name}: {len(utts)} utterances, dataset has {n}")
    again = json_safe(accuracy([u["reference"] for u in utts], [u["hypothesis"] for u in utts]))
    for key in ("wer_corpus_whisper_norm", "cer_corpus_whisper_norm", "wer_mean_utterance_paper_norm"):
        if not _close(again[key], s["accuracy"][key]):
            raise _Inconsistent(f"{name}: {key} {s['accuracy'][key]} but {again[key]} recomputed from the hypotheses")
    if s["kind"] != "whisfusion":
        wer = s["accuracy"]["wer_corpus_whisper_norm"]
        if wer is None or wer > CHECK_MAX_BASELINE_WER:
            raise _Inconsistent(f"{name}: Whisper baseline WER {wer} above {CHECK_MAX_BASELINE_WER}: "
                                "its pipeline is broken")


def _check_speed(s: dict, n: int) -> None:
    """Per-utterance timings are positive and add up to the system's aggregates; memory was measured."""
    name, utts, sp = s["label"], s["utterances"], s["speed"]
    single = len(sp["wall_s_per_repeat"]) == 1
    for u in utts:
        if not (u["latency_s"] and u["latency_s"] > 0 and u["duration_s"] > 0):
            raise _Inconsistent(f"{name}/{u['id']}: non-positive latency or duration")
        parts = u["load_audio_s"] + (u["encoder_s"] or 0.0) + (u["decoder_s"] or 0.0)
        # With several repeats each stage is its own median, and their sum may exceed the median total.
        if single and parts > u["latency_s"] * (1 + 1e-6):
            raise _Inconsistent(f"{name}/{u['id']}: stage times {parts:.4f} s exceed the latency {u['latency_s']:.4f} s")
        if u["bucket"] != bucket_of(u["duration_s"]):
            raise _Inconsistent(f"{name}/{u['id']}: bucket {u['bucket']} does not hold {u['duration_s']} s")
    if not _close(sum(u["duration_s"] for u in utts), sp["audio_s"], 1e-6):
        raise _Inconsistent(f"{name}: audio_s does not equal the sum of the utterance durations")
    if not _close(sp["rtfx"], sp["audio_s"] / sp["wall_s"], 1e-9):
        raise _Inconsistent(f"{name}: rtfx is not audio_s / wall_s")
    if single and not _close(sp["wall_s"], sum(u["latency_s"] for u in utts), 1e-6):
        raise _Inconsistent(f"{name}: wall_s is not the sum of the utterance latencies")
    if sum(b["n"] for b in s["latency_buckets"].values()) != n:
        raise _Inconsistent(f"{name}: latency buckets do not add up to {n} utterances")
    if sp["decoder_s"] and sp["decoder_s"] > 0:
        emitted = sum(u["emitted_tokens"] for u in utts if u["decoder_s"] is not None)
        if not _close(sp["tokens_per_s_emitted"], emitted / sp["decoder_s"], 1e-6):
            raise _Inconsistent(f"{name}: tokens_per_s_emitted is not emitted tokens / decoder time")
    if s["memory"]["peak_rss_mb"] <= 0:
        raise _Inconsistent(f"{name}: no peak memory measured")


def _check_files(s: dict, row: dict | None, hyp_rows: list[dict]) -> None:
    """results.csv and hypotheses.csv say what the JSON says."""
    name = s["label"]
    if row is None:
        raise _Inconsistent(f"{name}: missing from {RESULTS_CSV}")
    for key in ("wer_corpus_whisper_norm", "rtfx"):
        v = s["accuracy"].get(key, s["speed"].get(key))
        if (row[key] == "") != (v is None) or (v is not None and not _close(float(row[key]), v, 1e-9)):
            raise _Inconsistent(f"{name}: {RESULTS_CSV} {key}={row[key]!r} differs from the JSON ({v})")
    if [r["hypothesis"] for r in hyp_rows] != [u["hypothesis"] for u in s["utterances"]]:
        raise _Inconsistent(f"{name}: {HYPOTHESES_CSV} hypotheses differ from the JSON")
