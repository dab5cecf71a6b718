"""`whisfusion bench`: Whisfusion against Whisper baselines on one dataset, measured the same way for all.

Every system runs the same utterances in the same order; each utterance is timed from reading its audio
file to its final text, and Whisfusion runs through the same driver as `whisfusion transcribe`
(transcribe.Transcriber), so bench measures what users run. Accuracy in two labelled conventions (corpus
WER/CER after the Whisper English normaliser; the paper's mean of per-utterance WERs); speed as RTFx,
latency per duration bucket and decoder tokens per second; memory as peak RSS and, on a GPU, torch's peak
allocation.

Modules, in the order a run uses them:
  options  BenchOptions, BenchError, system specs (parse_system, the DecodingOptions fields a spec sets)
  metrics  normalisers, WER/CER, accuracy, duration buckets
  memory   MemoryMeter (peak RSS, GPU peak), sync (wait for the device before reading a clock)
  systems  Hypothesis; WhisfusionSystem (the transcribe driver), WhisperSystem, FasterWhisperSystem
  report   tables, results.json / .csv, hypotheses.csv, plots
  verify   verify_results (`--check`)
  run      run_bench (orchestration, resume of finished systems), bench_main (the CLI entry)
"""

from .metrics import accuracy, corpus_error_rates, mean_utterance_wer, normalise_paper, normalise_whisper
from .options import BenchError, BenchOptions, SystemSpec, parse_system
from .report import HYPOTHESES_CSV, PLOT_LATENCY, PLOT_WER_RTFX, RESULTS_CSV, RESULTS_JSON
from .run import bench_main, run_bench
from .verify import verify_results

__all__ = [
    "BenchError", "BenchOptions", "HYPOTHESES_CSV", "PLOT_LATENCY", "PLOT_WER_RTFX", "RESULTS_CSV", "RESULTS_JSON",
    "SystemSpec", "accuracy", "bench_main", "corpus_error_rates", "mean_utterance_wer", "normalise_paper",
    "normalise_whisper", "parse_system", "run_bench", "verify_results",
]
