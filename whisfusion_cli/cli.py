"""The `whisfusion` command line: a thin Typer layer over the package's functions.

Only typer (and what it pulls in) is imported at start-up; every command imports its module inside the
function, so `whisfusion --help` never loads torch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__, first_line
from .choices import (ALL_FORMATS, DEVICES, DTYPES, ENGINES, ENCODER_BACKENDS, ENCODER_MODES, MAX_SEGMENT_SECONDS,
                      OUTPUT_FORMATS, SELECTIONS, STRATEGIES, TRAIN_STAGES)

EXIT_FAILED = 1  # some input failed, or the run could not start
EXIT_USAGE = 2  # bad options (click's own convention)
EXIT_INTERRUPTED = 130
# Idle OpenMP threads sleep instead of spinning (libgomp reads this once, when torch loads). The decoders run
# many short parallel regions; on cores other processes also use, spinning threads fight them for the CPU:
# `transcribe jfk.wav` with 2 threads on 2 busy cores took 9-12 s spinning, 2.9-3.4 s passive. The user's own
# setting wins.
OMP_WAIT_POLICY = "PASSIVE"

app = typer.Typer(
    name="whisfusion",
    help="Non-autoregressive speech recognition: a Whisper encoder + a masked-diffusion decoder "
    "(Parallel Diffusion Decoding).\n\n"
    "\b\nExamples:\n"
    "  whisfusion transcribe talk.mp3\n"
    "  whisfusion transcribe recordings/ -o transcripts -f all\n"
    "  whisfusion download whisfusion\n"
    "  whisfusion transcribe meeting.wav --model whisfusion --device cuda",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _complete(choices):
    def complete(incomplete: str):
        return [c for c in choices if c.startswith(incomplete)]

    return complete


def _complete_model(incomplete: str):
    from .hub import known_names  # cheap: the registry has no heavy imports

    return [n for n in known_names() if n.startswith(incomplete)]


def _version(value: bool):
    if value:
        typer.echo(f"whisfusion {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """Whisfusion: speech to text with a Whisper encoder and a masked-diffusion decoder."""


# ------------------------------------------------------------------------------------------ transcribe


class TranscribeFlags:
    """`transcribe`'s argument and options, one definition each, in the order --help lists them (the command's
    signature names them): output, decoding, verification, runtime, audio windows, subtitles."""

    inputs = typer.Argument(..., metavar="INPUTS", help="Audio files, directories (searched recursively) or globs.")
    model = typer.Option(None, "--model", "-m", autocompletion=_complete_model,
                         help="Registered name (see `whisfusion download --list`), a model directory, or omit for "
                         "the embedded default model.")
    output_dir = typer.Option(None, "--output-dir", "-o", file_okay=False,
                              help="Write one file per input and format here (default: print to stdout).")
    output_format = typer.Option("txt", "--output-format", "-f",
                                 autocompletion=_complete(OUTPUT_FORMATS + (ALL_FORMATS,)),
                                 help="txt, vtt, srt, tsv, json, all, or a comma-separated list.")
    overwrite = typer.Option(False, "--overwrite", help="Redo inputs whose outputs already exist.")
    batch_size = typer.Option(8, "--batch-size", "-b", min=1, help="Windows per batch, across files.")

    steps = typer.Option(None, "--steps", min=1, help="Diffusion steps (model default if unset).")
    candidates = typer.Option(None, "--candidates", "-k", min=1,
                              help="Parallel candidates K (model default if unset).")
    schedule = typer.Option(None, "--schedule", metavar="R1,R2,...",
                            help="Mask ratio per step, e.g. 1.0,0.9,0.85,0.8.")
    selection = typer.Option(None, "--selection", autocompletion=_complete(SELECTIONS),
                             help="Candidate selection: confidence, mbr or rover.")
    strategy = typer.Option(None, "--strategy", autocompletion=_complete(STRATEGIES),
                            help="Unmasking: remask (upstream) or confidence.")
    refine = typer.Option(None, "--refine", min=0, help="Mask-predict passes after the fill (unset: the model's).")
    refine_no_copy = typer.Option(None, "--refine-no-copy/--refine-copy", help="Refine: no copy of the word before.")
    shortlist = typer.Option(None, "--shortlist", min=0, help="After the first step, score only each position's N "
                             "best tokens (faster; 0: whole vocabulary, exact).")
    shortlist_int8 = typer.Option(None, "--shortlist-int8/--shortlist-float",
                                  help="Pick the shortlist through an int8 output projection (CPU; faster).")
    pad_context = typer.Option(None, "--pad-context", metavar="N|off", help="Once a transcript's end is predicted, "
                               "decode only it and N positions after it (faster); off: the whole canvas.")
    seed = typer.Option(None, "--seed", help="Seed for reproducible decoding.")
    seq_len = typer.Option(None, "--seq-len", metavar="N|auto",
                           help="Canvas length in tokens, or 'auto' to size it to the audio.")

    verify = typer.Option(None, "--verify/--no-verify",
                          help="Correct each window's text with Whisper's own decoder.")
    verify_short = typer.Option(None, "--verify-short", metavar="S", min=0.0,
                                help="With --verify: windows <= S s also read by Whisper's decoder on padded audio.")

    device = typer.Option("auto", "--device", autocompletion=_complete(DEVICES),
                          help="auto, cpu, cuda (or cuda:N).")
    dtype = typer.Option("auto", "--dtype", autocompletion=_complete(DTYPES),
                         help="auto (float32 on CPU, bfloat16/float16 on GPU), float32, bfloat16, float16.")
    threads = typer.Option(None, "--threads", min=1, help="CPU threads.")
    engine = typer.Option("auto", "--engine", autocompletion=_complete(ENGINES), help="numpy (CPU, float32, no "
                          "torch: fastest start), torch (every device, option), auto (numpy where it can).")
    int8 = typer.Option(None, "--int8/--no-int8", help="int8 dynamic quantisation of the decoder and encoder (CPU, "
                        "torch engine). Default: the model's choice on torch.")
    encoder_backend = typer.Option(None, "--encoder-backend", autocompletion=_complete(ENCODER_BACKENDS),
                                   help="torch, ctranslate2 (CTranslate2's Whisper encoder) or auto (model default "
                                   "if unset).")

    vad = typer.Option(True, "--vad/--no-vad",
                       help="Cut long audio at pauses and skip silence (--no-vad: fixed 30 s windows).")
    max_window_s = typer.Option(None, "--max-window", metavar="SECONDS",
                                help="Longest window (at most 30 s and the model's own limit).")
    split_silence_s = typer.Option(None, "--split-silence", metavar="SECONDS",
                                   help="A pause this long ends a window (default: the model's, else 2 s).")

    word_timestamps = typer.Option(False, "--word-timestamps", help="Time every word (from the decoder's "
                                   "cross-attention); segments and JSON get per-word times.")
    max_line_width = typer.Option(None, "--max-line-width", min=1, metavar="CHARS",
                                  help="SRT/VTT: wrap cue text into lines of at most this width.")
    max_line_count = typer.Option(None, "--max-line-count", min=1, metavar="LINES",
                                  help="SRT/VTT: at most this many lines per cue (needs --max-line-width).")
    highlight_words = typer.Option(False, "--highlight-words",
                                   help="SRT/VTT: underline each spoken word (needs --word-timestamps).")
    max_segment_s = typer.Option(MAX_SEGMENT_SECONDS, "--max-cue-duration", min=0.5, metavar="SECONDS",
                                 help="Longest segment (subtitle cue); segments also end at sentence ends and "
                                 "pauses.")
    quiet = typer.Option(False, "--quiet", "-q", help="No progress display and no notes; errors only.")


@app.command(
    epilog="\b\nExamples:\n"
    "  whisfusion transcribe jfk.wav\n"
    "  whisfusion transcribe 'podcasts/**/*.mp3' -o out -f srt,json\n"
    "  whisfusion transcribe calls/ -o out -f all --batch-size 16 --quiet\n"
    "  whisfusion transcribe talk.flac -m whisfusion --steps 8 -k 15 --selection rover --seed 0\n"
    "  whisfusion transcribe lecture.mp3 -o subs -f srt --word-timestamps --max-line-width 42 --max-line-count 2\n"
    "  torchrun --nproc_per_node 8 -m whisfusion_cli.cli transcribe calls/ -o out   (a GPU per rank, split by file)\n\n"
    "Re-running with the same --output-dir skips files whose outputs exist and were made with the same model "
    "and options (other settings redo the file; --overwrite redoes every file). -f json without --output-dir "
    "prints one JSON object per input and line (JSON Lines). "
    "Exit code: 0 if every input was transcribed, 1 if any failed, 130 when interrupted.",
)
def transcribe(
    inputs: List[str] = TranscribeFlags.inputs,
    model: Optional[str] = TranscribeFlags.model,
    output_dir: Optional[Path] = TranscribeFlags.output_dir,
    output_format: str = TranscribeFlags.output_format,
    overwrite: bool = TranscribeFlags.overwrite,
    batch_size: int = TranscribeFlags.batch_size,
    steps: Optional[int] = TranscribeFlags.steps,
    candidates: Optional[int] = TranscribeFlags.candidates,
    schedule: Optional[str] = TranscribeFlags.schedule,
    selection: Optional[str] = TranscribeFlags.selection,
    strategy: Optional[str] = TranscribeFlags.strategy,
    refine: Optional[int] = TranscribeFlags.refine,
    refine_no_copy: Optional[bool] = TranscribeFlags.refine_no_copy,
    shortlist: Optional[int] = TranscribeFlags.shortlist,
    shortlist_int8: Optional[bool] = TranscribeFlags.shortlist_int8,
    pad_context: Optional[str] = TranscribeFlags.pad_context,
    seed: Optional[int] = TranscribeFlags.seed,
    seq_len: Optional[str] = TranscribeFlags.seq_len,
    verify: Optional[bool] = TranscribeFlags.verify,
    verify_short: Optional[float] = TranscribeFlags.verify_short,
    device: str = TranscribeFlags.device,
    dtype: str = TranscribeFlags.dtype,
    threads: Optional[int] = TranscribeFlags.threads,
    engine: str = TranscribeFlags.engine,
    int8: Optional[bool] = TranscribeFlags.int8,
    encoder_backend: Optional[str] = TranscribeFlags.encoder_backend,
    vad: bool = TranscribeFlags.vad,
    max_window_s: Optional[float] = TranscribeFlags.max_window_s,
    split_silence_s: Optional[float] = TranscribeFlags.split_silence_s,
    word_timestamps: bool = TranscribeFlags.word_timestamps,
    max_line_width: Optional[int] = TranscribeFlags.max_line_width,
    max_line_count: Optional[int] = TranscribeFlags.max_line_count,
    highlight_words: bool = TranscribeFlags.highlight_words,
    max_segment_s: float = TranscribeFlags.max_segment_s,
    quiet: bool = TranscribeFlags.quiet,
):
    """Transcribe audio files, folders and globs to text, subtitles or JSON."""
    flags = dict(locals())  # each parameter is named for the options field it sets (tests/test_cli.py checks)
    from .transcribe import STATUS_ERROR, options_from_flags

    inputs, quiet = flags.pop("inputs"), flags.pop("quiet")
    try:
        options = options_from_flags(**flags)
        group = _transcribe_group(options)
    except ValueError as e:
        _err(f"error: {e}")
        raise typer.Exit(EXIT_USAGE)
    display = not quiet and (group is None or group.is_main)
    counts, audio_seconds, elapsed = _transcribe_and_print(inputs, options, display)
    counts, audio_seconds, ranks = _across_ranks(group, counts, audio_seconds)
    if display:
        _err(_summary(counts, audio_seconds, elapsed, ranks))
    if counts[STATUS_ERROR]:
        raise typer.Exit(EXIT_FAILED)


def _transcribe_and_print(inputs: List[str], options, display: bool) -> tuple[dict, float, float]:
    """Run `transcribe` and print each result (to stdout without --output-dir), its notes and errors (stderr);
    (counts per status, audio seconds, wall seconds). display: the progress display and the notes."""
    from .audio import AudioError
    from .display import RichReporter
    from .transcribe import STATUS_ERROR, STATUS_OK, STATUS_SILENT, STATUS_SKIPPED, transcribe as run
    from .writers import get_writer, parse_formats

    reporter = RichReporter() if display else None
    note = reporter.print if reporter else (lambda message: None)
    fmt = parse_formats(options.output_format)[0]
    printer = None if options.output_dir is not None else get_writer(fmt, ".", options.subtitles).writers[0]
    counts = {STATUS_OK: 0, STATUS_SILENT: 0, STATUS_SKIPPED: 0, STATUS_ERROR: 0}
    n_printed, audio_seconds, t0 = 0, 0.0, time.perf_counter()
    many = len(inputs) > 1 or any(Path(i).is_dir() or any(c in i for c in "*?[") for i in inputs)
    try:
        for result in run(inputs, options, reporter=reporter):
            for line in result.notes:
                note(f"note: {line}")
            counts[result.status] += 1
            audio_seconds += result.duration
            if result.status == STATUS_ERROR:
                _err(f"error: {result.error}")
                continue
            if result.status == STATUS_SKIPPED:
                continue
            if result.status == STATUS_SILENT:
                note(f"note: {result.path}: no speech detected; empty transcript")
            if printer is not None:
                _print_result(printer, result, many, fmt, first=n_printed == 0)
                n_printed += 1
    except KeyboardInterrupt:
        if reporter:
            reporter.stop()
        _err("interrupted: finished files are saved; run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    except (AudioError, ValueError, RuntimeError, OSError) as e:
        if reporter:
            reporter.stop()
        _err(f"error: {first_line(e, limit=None)}")
        raise typer.Exit(EXIT_FAILED)
    return counts, audio_seconds, time.perf_counter() - t0


def _summary(counts: dict, audio_seconds: float, elapsed: float, ranks: str) -> str:
    from .transcribe import STATUS_ERROR, STATUS_OK, STATUS_SILENT, STATUS_SKIPPED

    speed = f", {audio_seconds / elapsed:.1f} audio-s/s" if audio_seconds and elapsed > 0 else ""
    skipped = f", {counts[STATUS_SKIPPED]} skipped (outputs exist; --overwrite to redo)" if counts[STATUS_SKIPPED] else ""
    return (f"{counts[STATUS_OK] + counts[STATUS_SILENT]} transcribed ({counts[STATUS_SILENT]} silent){skipped}, "
            f"{counts[STATUS_ERROR]} failed in {elapsed:.1f} s{ranks}{speed}")


def _transcribe_group(options):
    """Under torchrun (WORLD_SIZE > 1): the ranks' group, each rank transcribing its share of the files on
    its own device (set as `options.shard`); None in a single process."""
    from .distributed import Group, Ranks

    if Ranks.from_env().world == 1:
        return None
    if options.output_dir is None:
        raise ValueError("under torchrun every rank writes its own files: give --output-dir")
    group = Group.start(options.device)
    options.shard = (group.rank, group.world)
    return group


def _across_ranks(group, counts: dict, audio_seconds: float) -> tuple[dict, float, str]:
    """Rank 0 reports for all ranks, and every rank exits 1 if any file failed anywhere: the counts and the
    audio seconds summed over the ranks, and the summary's " on N ranks" (in one process: as they are)."""
    if group is None:
        return counts, audio_seconds, ""
    shares = group.gather((counts, audio_seconds))
    counts = {k: sum(c[k] for c, _ in shares) for k in counts}
    group.barrier()
    group.close()
    return counts, sum(a for _, a in shares), f" on {group.world} ranks"


def _print_result(printer, result, many: bool, fmt: str, first: bool) -> None:
    import json

    if fmt == "json":  # one compact object per input and line (JSON Lines), easy to pipe
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    else:
        if many:
            sys.stdout.write(("" if first else "\n") + f"==> {result.path} <==\n")
        text = printer.render(result)
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    sys.stdout.flush()


# -------------------------------------------------------------------------------------------- download


@app.command(
    epilog="\b\nExamples:\n"
    "  whisfusion download --list\n"
    "  whisfusion download whisfusion\n"
    "  whisfusion download whisfusion --local-dir models/wf    (then: --model models/wf)\n"
    "  HF_ENDPOINT=https://hf-mirror.example whisfusion download tinyllama-tokenizer\n\n"
    "Files go to the Hugging Face cache (HF_HOME / HF_HUB_CACHE). With HF_HUB_OFFLINE=1 nothing is fetched; "
    "transcribe --model NAME then reads the cache.",
)
def download(
    name: str = typer.Argument("whisfusion", autocompletion=_complete_model,
                               help="A model or artefact name (see --list)."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", file_okay=False,
                                             help="Download into this directory instead of the cache."),
    list_: bool = typer.Option(False, "--list", "-l", help="Show the known names and what is present."),
):
    """Fetch the released Whisfusion artefacts (decoder, adapter, SMDM base, whisper-small, tokenizer)."""
    from . import hub

    if list_:
        _print_list(hub, local_dir)
        return
    try:
        path = hub.download(name, local_dir=local_dir)
    except hub.HubError as e:
        _err(f"error: {e}")
        raise typer.Exit(EXIT_FAILED)
    kind = "model directory" if name in hub.KNOWN_MODELS else "files"
    typer.echo(f"{name}: {kind} ready at {path}")


def _print_list(hub, local_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    s = hub.settings()
    table = Table(title=f"known models and artefacts ({'local dir ' + str(local_dir) if local_dir else 'cache ' + str(s.cache_dir)})")
    for col in ("name", "kind", "status", "on disk", "source", "description"):
        table.add_column(col)
    for row in hub.list_artefacts(local_dir=local_dir):
        size = f"{row.size_bytes / 1e6:.1f} MB" if row.size_bytes else "-"
        table.add_row(row.name, row.kind, row.status, size, row.source, row.description)
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    if s.offline:
        typer.echo("offline mode (HF_HUB_OFFLINE) is on: downloads are disabled")


# --------------------------------------------------------------- commands implemented in other modules


def _pair(text: Optional[str], name: str):
    if text is None:
        return None
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected two numbers like 0.9,0.95, got {text!r}", param_hint=name) from None
    return (a, b)


def _run_training_job(fn, kwargs: dict, resume_hint: str) -> None:
    from .checkpoint import CheckpointError
    from .data import DatasetError

    try:
        fn(**kwargs)
    except KeyboardInterrupt:
        _err(f"interrupted: {resume_hint}")
        raise typer.Exit(EXIT_INTERRUPTED)
    except (DatasetError, CheckpointError, ValueError, RuntimeError, OSError) as e:
        _err(f"error: {first_line(e, limit=None)}")
        raise typer.Exit(EXIT_FAILED)


@app.command(
    epilog="\b\nExamples:\n"
    "  whisfusion preprocess LibriSpeech/train-clean-100 -o shards/clean100 --encoder-mode full --encoder openai/whisper-small\n"
    "  whisfusion preprocess my_manifest.jsonl -o shards/mine\n"
    "  torchrun --nproc_per_node 4 -m whisfusion_cli.cli preprocess corpus/ -o shards/corpus   (ranks split the shards)\n\n"
    "Shards are written atomically; running the same command again resumes where it stopped. Unreadable audio "
    "is reported and skipped (listed in index.json). --encoder-mode full keeps all 1500 frames of every 30 s "
    "window (upstream's training input); short/pad_trim keep only the frames that cover the audio.",
)
def preprocess(
    dataset: str = typer.Argument(..., metavar="DATASET", help="LibriSpeech-layout tree, JSONL/CSV manifest "
                                  "(audio, text, optional start/end/id), or folder of audio with same-name .txt."),
    output: Path = typer.Option(..., "--output", "-o", file_okay=False, help="Shard folder to write (or resume)."),
    encoder_source: str = typer.Option("tiny.en", "--encoder", help="Whisper encoder: tiny.en, a model dir or a hub name."),
    encoder_mode: str = typer.Option("short", "--encoder-mode", autocompletion=_complete(ENCODER_MODES),
                                     help="short (fast, audio-length input), pad_trim, or full (upstream)."),
    encoder_int8: bool = typer.Option(False, "--int8", help="int8 dynamic quantisation of the encoder (CPU)."),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16, bfloat16 or float32."),
    shard_size: int = typer.Option(512, "--shard-size", min=1, help="Utterances per shard."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Utterances per encoder call."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or size report."),
):
    """Encode a dataset's audio once with the frozen Whisper encoder into safetensors shards for training."""
    flags = dict(locals())  # each parameter is named for the options field it sets (tests/test_cli.py checks)
    from .data import preprocess_main

    if encoder_mode not in ENCODER_MODES:
        raise typer.BadParameter(f"choose from {', '.join(ENCODER_MODES)}", param_hint="--encoder-mode")
    # The encoder spec records int8 only when it is on, as shards made before it have it.
    flags.update(input=flags.pop("dataset"), output=str(output), encoder_int8=encoder_int8 or None,
                 progress=not flags.pop("quiet"))
    _run_training_job(preprocess_main, flags, "finished shards are kept; run the same command again to resume")


@app.command(
    epilog="\b\nExamples:\n"
    "  whisfusion train --data shards/ -o runs/tiny --init tiny.en --max-steps 3000      (Whisper-initialised)\n"
    "  whisfusion train --data shards/ -o runs/s1 --stage 1 --base mdm-170M.safetensors --tokenizer tokenizer.json\n"
    "  whisfusion train --data shards/ -o runs/s2 --stage 2 --base mdm-170M.safetensors \\\n"
    "      --init runs/s1/whisfusion_stage1_adapter.pt --tokenizer tokenizer.json --layer-decay 0.9\n"
    "  torchrun --nproc_per_node 4 -m whisfusion_cli.cli train --data shards/ -o runs/s1 --stage 1 ...   (DDP)\n\n"
    "Defaults (learning rate, betas, weight decay, clipping, mask ratios, EMA) are upstream's for --stage 1/2. "
    "Writes RUN/model (for transcribe --model), upstream .pt files for the SMDM family, RUN/last.pt "
    "(continue with --resume) and RUN/metrics.jsonl.",
)
def train(
    data: List[str] = typer.Option(..., "--data", help="Shard folder from `whisfusion preprocess` (repeat to "
                                   "train on several)."),
    output: Path = typer.Option(..., "--output", "-o", file_okay=False, help="Run folder."),
    stage: str = typer.Option("scratch", "--stage", autocompletion=_complete(TRAIN_STAGES),
                              help="1 (adapter only), 2 (full decoder), scratch (random or Whisper init)."),
    base: Optional[str] = typer.Option(None, "--base", help="SMDM base weights (stages 1 and 2)."),
    init: Optional[str] = typer.Option(None, "--init", help="Stage 2: stage-1 adapter or full decoder. Scratch: "
                                       "'random' (default), a Whisper model (tiny.en, dir, hub name) or a model dir."),
    config: Optional[str] = typer.Option(None, "--config", help="Decoder config JSON or preset (SMDM family)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer.json (Whisper init: its own)."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Validation shards (default: held out from --data)."),
    val_items: int = typer.Option(200, "--val-items", min=0, help="Validation utterances."),
    wer_items: int = typer.Option(32, "--wer-items", min=0, help="Validation utterances decoded for the WER."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=2, help="Canvas length (default 256 SMDM, auto Whisper)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Per rank and accumulation step."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Gradient accumulation steps."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: the stage's upstream rule)."),
    min_lr_ratio: Optional[float] = typer.Option(None, "--min-lr-ratio", help="Cosine floor as a fraction of --lr."),
    warmup: float = typer.Option(0.1, "--warmup", min=0, help="Warm-up: fraction of the run if < 1, else steps."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Schedule length (default: from --epochs)."),
    epochs: float = typer.Option(10.0, "--epochs", min=0.0, help="Epochs when --max-steps is not given."),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", min=1, help="Stop after this step, schedule unchanged."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", min=0.0, help="Minutes; stop cleanly after."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    betas: Optional[str] = typer.Option(None, "--betas", help="AdamW betas, e.g. 0.9,0.95."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Gradient-norm clip (0 = off)."),
    mask_range: Optional[str] = typer.Option(None, "--mask-range", help="t ~ U(lo,hi), e.g. 0.7,1.0 (stage 2)."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="EMA decay (stage 2 default 0.995; 0 = off)."),
    layer_decay: Optional[float] = typer.Option(None, "--layer-decay", help="Layer-wise LR decay, e.g. 0.9."),
    freeze_embeddings: Optional[bool] = typer.Option(None, "--freeze-embeddings/--train-embeddings",
                                                     help="Whisper family: keep the tied token table fixed (default)."),
    freeze: List[str] = typer.Option([], "--freeze", metavar="PATTERN",
                                     help="Keep every parameter whose name contains PATTERN at its initial value "
                                     "(repeatable), e.g. encoder_attn (the cross-attention) or layers.0."),
    eval_every: int = typer.Option(500, "--eval-every", min=1, help="Steps between validations."),
    save_every: int = typer.Option(500, "--save-every", min=1, help="Steps between last.pt checkpoints."),
    log_every: int = typer.Option(10, "--log-every", min=1, help="Steps between metrics lines."),
    patience: Optional[int] = typer.Option(5, "--patience", min=0, help="Early stopping after N evaluations without "
                                           "improvement (0 = off)."),
    decode_steps: Optional[int] = typer.Option(None, "--decode-steps", min=1,
                                               help="Diffusion steps for the validation WER (SMDM 4, Whisper 8)."),
    decode_candidates: Optional[int] = typer.Option(None, "--decode-candidates", min=1,
                                                    help="Candidates for the validation WER (SMDM 15, Whisper 1)."),
    canvas: str = typer.Option("fixed", "--canvas", help="fixed (every canvas --seq-len long, upstream) or audio "
                               "(sized to each batch's audio as decoding sizes it)."),
    state_time_mask: float = typer.Option(0.0, "--state-time-mask", min=0.0, max=0.49,
                                          help="Augmentation: mask up to 2 spans of this fraction of each item's "
                                          "encoder frames (0 = off)."),
    state_noise: float = typer.Option(0.0, "--state-noise", min=0.0,
                                      help="Augmentation: Gaussian noise on the encoder states, relative std (0 = off)."),
    seed: int = typer.Option(1234, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available)."),
    precision: str = typer.Option("auto", "--precision", help="auto (fp32 on CPU; on GPU bf16 where native, "
                                   "else fp16 with loss scaling), fp32, bf16, fp16."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output exactly where it stopped."),
    distill: float = typer.Option(0.0, "--distill", min=0.0, help="Weight of a KL term to a frozen, causal copy of "
                                  "a pre-trained Whisper decoder, teacher-forced on each item (Whisper family; 0: off)."),
    distill_teacher: str = typer.Option("tiny.en", "--distill-teacher", help="The teacher: a Whisper name or directory."),
    copy_loss: float = typer.Option(0.0, "--copy-loss", min=0.0, help="Weight of an unlikelihood term against "
                                    "predicting a neighbour's token at a masked position (0: off)."),
    self_correct: float = typer.Option(0.0, "--self-correct", min=0.0, max=1.0,
                                       help="Share of the masked positions given the model's own predictions "
                                       "before the training forward, the loss still on all of them (SMART; 0: off)."),
    name: str = typer.Option("whisfusion", "--name", help="Prefix of the upstream-format .pt files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
):
    """Train the masked-diffusion decoder on preprocessed shards: upstream's stage 1 / stage 2, or from scratch."""
    flags = dict(locals())  # each parameter is named for the options field it sets (tests/test_cli.py checks)
    from .train import train_main

    if stage not in TRAIN_STAGES:
        raise typer.BadParameter(f"choose from {', '.join(TRAIN_STAGES)}", param_hint="--stage")
    flags.update(data=data if len(data) > 1 else data[0], output=str(output), betas=_pair(betas, "--betas"),
                 mask_range=_pair(mask_range, "--mask-range"), patience=patience or None, freeze=tuple(freeze),
                 progress=not flags.pop("quiet"))
    _run_training_job(train_main, flags, f"continue with the same command plus --resume (from {output}/last.pt)")


@app.command(
    epilog="\b\nExamples:\n"
    "  whisfusion bench LibriSpeech/test-clean --limit 200\n"
    "  whisfusion bench manifest.jsonl -s whisfusion:model=default,steps=8,candidates=4,selection=rover,seq_len=auto \\\n"
    "      -s whisper:tiny.en -s whisper:tiny.en,beams=5 -s faster-whisper:tiny.en,compute_type=int8\n"
    "  whisfusion bench --check          (CI: the bundled example clips, then consistency checks)\n\n"
    "\b\nSystem specs: KIND:MODEL,key=value,...\n"
    "  whisfusion      model (default|DIR|name), engine (auto|numpy|torch), int8 (0|1), encoder_mode,\n"
    "                  encoder_backend, label, and any\n"
    "                  one-word decoding option: steps, candidates, selection, seq_len|canvas (N|auto),\n"
    "                  strategy, refine, refine_no_copy (0|1), shortlist, shortlist_int8 (0|1), pad_context (N|off), seed, ...\n"
    "  whisper         model (tiny.en|DIR|hub name), beams, label   (transformers generate)\n"
    "  faster-whisper  model (tiny.en|CT2 DIR), beams, compute_type, label\n\n"
    "Writes results.json, results.csv, hypotheses.csv, wer_vs_rtfx.png and latency_vs_duration.png to "
    "--output-dir; finished systems are reused when the same run is restarted (--fresh to redo). "
    "Exit code 1 on bad input or a failed --check.",
)
def bench(
    dataset: Optional[str] = typer.Argument(None, metavar="DATASET",
                                            help="LibriSpeech-layout tree, JSONL/CSV manifest, or folder of audio "
                                            "with .txt transcripts (optional with --check)."),
    systems: List[str] = typer.Option([], "--system", "-s", metavar="SPEC",
                                     help="A system to run (repeatable). Default: the embedded Whisfusion model, "
                                     "Whisper tiny.en greedy, and faster-whisper tiny.en int8 if installed."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Only the first N utterances."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0,
                                         help="Unmeasured runs of the first utterance per system (default 1; "
                                         "0 with --check)."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Measured passes; timings are medians."),
    threads: int = typer.Option(2, "--threads", min=1, help="CPU threads for torch and CTranslate2."),
    device: str = typer.Option("auto", "--device", autocompletion=_complete(DEVICES),
                               help="auto, cpu, cuda (or cuda:N)."),
    dtype: str = typer.Option("auto", "--dtype", autocompletion=_complete(DTYPES),
                              help="auto (float32 on CPU, bfloat16/float16 on GPU), float32, bfloat16, float16."),
    output_dir: Path = typer.Option(Path("bench-results"), "--output-dir", "-o", file_okay=False,
                                    help="Where results and plots go."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG plots (needs matplotlib)."),
    fresh: bool = typer.Option(False, "--fresh", help="Rerun every system, even if finished results exist."),
    check: bool = typer.Option(False, "--check",
                               help="CI mode: a few utterances, no warm-up, then verify the written results."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display and no table."),
):
    """Benchmark Whisfusion against Whisper baselines: WER (two conventions), RTFx, latency, tokens/s, memory."""
    flags = dict(locals())  # each parameter is named for the options field it sets (tests/test_cli.py checks)
    from .bench import BenchError, bench_main

    flags.update(systems=list(systems), output_dir=str(output_dir), resume=not flags.pop("fresh"))
    try:
        bench_main(**flags)
    except KeyboardInterrupt:
        _err("interrupted: finished systems are saved; run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED)
    except (BenchError, ValueError, RuntimeError, OSError) as e:
        _err(f"error: {first_line(e, limit=None)}")
        raise typer.Exit(EXIT_FAILED)


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    app(prog_name="whisfusion")


if __name__ == "__main__":
    main()
