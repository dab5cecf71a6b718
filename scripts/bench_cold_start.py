"""Cold start: `whisfusion transcribe` as a whole process against Whisper tiny.en through faster-whisper
(int8, greedy, temperature 0, no VAD), on the same files and CPU threads, in one run.

Each measurement is a fresh Python process, as a user runs the command: wall time from start to exit and
peak resident set size (the child's ru_maxrss from wait4). The two systems run in interleaved pairs (the
order alternates from pair to pair, so drifting machine load falls on both); each ratio printed is the
median over the pairs of whisfusion / faster-whisper. One unmeasured run of each comes first (page cache).

Jobs: the bundled example (jfk.wav, 11 s) and a folder of 20 short real clips (tests/data/asterisk20 unless
--folder), given to each system as one process (whisfusion gets the folder, faster-whisper its files).
Then a breakdown of where each system's time goes, from in-process runs with timers (median of
--breakdown-runs fresh processes each): imports, weights (model load), audio (reading, plus whisfusion's
VAD windows), encoder (features included), decoder. Last, `whisfusion --help` (median of --help-runs).

    python scripts/bench_cold_start.py                       # 2 threads, 5 pairs per job
    python scripts/bench_cold_start.py --pairs 9 --threads 1 --json results/cold_start.json

The whisfusion processes run this checkout (`python -m whisfusion_cli.cli` from the repository root).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JFK = ROOT / "whisfusion_cli" / "assets" / "examples" / "jfk.wav"
FOLDER = ROOT / "tests" / "data" / "asterisk20"
AUDIO_SUFFIXES = (".wav", ".flac")
SYSTEMS = ("whisfusion", "faster-whisper")
# The targets (whisfusion / faster-whisper): wall and peak RSS on jfk.wav, wall on the folder; --help.
TARGETS = {("jfk", "wall"): 1.0, ("jfk", "rss"): 1.5, ("folder", "wall"): 0.7}
HELP_TARGET_S = 0.3
STAGES = ("imports", "weights", "audio", "encoder", "decoder")

FASTER_WHISPER_CMD = """
import sys
from faster_whisper import WhisperModel
model = WhisperModel(sys.argv[1], device="cpu", compute_type="int8", cpu_threads=int(sys.argv[2]))
for path in sys.argv[3:]:
    segments, _ = model.transcribe(path, beam_size=1, temperature=0.0, condition_on_previous_text=False,
                                   vad_filter=False, language="en")
    print(" ".join(s.text.strip() for s in segments))
"""


def audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)


def command(system: str, inputs: list[Path], threads: int, tiny_en: str, engine: str = "auto") -> list[str]:
    if system == "whisfusion":
        return [sys.executable, "-m", "whisfusion_cli.cli", "transcribe", *map(str, inputs), "--device", "cpu",
                "--threads", str(threads), "--engine", engine]
    files = [f for p in inputs for f in (audio_files(p) if p.is_dir() else [p])]
    return [sys.executable, "-c", FASTER_WHISPER_CMD, tiny_en, str(threads), *map(str, files)]


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    env.pop("PYTHONSTARTUP", None)
    return env


def measure(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stdout): the child is waited for with wait4, which gives its own rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss / 1024, out  # ru_maxrss is in KiB on Linux


def pairs(job: str, inputs: list[Path], args, tiny_en: str) -> dict:
    env = child_env(args.threads)
    cmds = {s: command(s, inputs, args.threads, tiny_en, args.engine) for s in SYSTEMS}
    outputs = {s: measure(cmds[s], env)[2] for s in SYSTEMS}  # warm-up, unmeasured
    rows = {s: [] for s in SYSTEMS}
    for i in range(args.pairs):
        for s in (SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]):
            wall, rss, out = measure(cmds[s], env)
            if out != outputs[s]:
                raise SystemExit(f"{job}: {s} printed a different transcript in pair {i + 1}")
            rows[s].append((wall, rss))
        print(f"  {job} pair {i + 1}/{args.pairs}: " + ", ".join(
            f"{s} {rows[s][-1][0]:.2f} s {rows[s][-1][1]:.0f} MiB" for s in SYSTEMS), file=sys.stderr)
    a, b = rows["whisfusion"], rows["faster-whisper"]
    return {
        "wall_s": {s: statistics.median(w for w, _ in rows[s]) for s in SYSTEMS},
        "peak_rss_mib": {s: statistics.median(r for _, r in rows[s]) for s in SYSTEMS},
        "wall_ratio": statistics.median(x[0] / y[0] for x, y in zip(a, b)),
        "rss_ratio": statistics.median(x[1] / y[1] for x, y in zip(a, b)),
        "runs": rows, "transcripts": outputs,
    }


# ---------------------------------------------------------------------------------------- breakdown


def child_whisfusion(files: list[Path], threads: int, engine: str) -> dict:
    t0 = time.perf_counter()
    from whisfusion_cli.cli import OMP_WAIT_POLICY

    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # as `whisfusion` sets it, before torch loads
    from whisfusion_cli.audio import load_audio
    from whisfusion_cli.loading import Pipeline
    from whisfusion_cli.transcribe import TranscribeOptions
    from whisfusion_cli.vad import VadOptions, iter_windows

    options = TranscribeOptions(device="cpu", threads=threads, engine=engine)
    t1 = time.perf_counter()
    pipeline = Pipeline.load(options)  # the engine's own imports (torch's for the torch engine) count as weights
    times = {"imports": t1 - t0, "weights": time.perf_counter() - t1, "audio": 0.0, "encoder": 0.0, "decoder": 0.0}
    vad = pipeline.vad_options(VadOptions())
    for path in files:
        t = time.perf_counter()
        windows = [(i, w, c) for i, (w, c) in enumerate(iter_windows([load_audio(path)], vad)) if not w.silent]
        t_audio = time.perf_counter()
        states = pipeline.encode([c for _, _, c in windows]) if windows else []
        t_enc = time.perf_counter()
        if windows:
            seed = pipeline.decoding.seed
            pipeline.decode(states, [w.duration for _, w, _ in windows],
                            [None if seed is None else seed + i for i, _, _ in windows])
        t_dec = time.perf_counter()
        times["audio"] += t_audio - t
        times["encoder"] += t_enc - t_audio
        times["decoder"] += t_dec - t_enc
    return times


def child_faster_whisper(files: list[Path], threads: int, tiny_en: str) -> dict:
    t0 = time.perf_counter()
    from faster_whisper import WhisperModel, decode_audio

    t1 = time.perf_counter()
    model = WhisperModel(tiny_en, device="cpu", compute_type="int8", cpu_threads=threads)
    times = {"imports": t1 - t0, "weights": time.perf_counter() - t1, "audio": 0.0, "encoder": 0.0, "decoder": 0.0}
    encode, extract = model.encode, model.feature_extractor

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times["encoder"] += time.perf_counter() - t
        return wrapper

    model.encode = timed(encode)
    model.feature_extractor = type("Timed", (), {"__call__": staticmethod(timed(extract)),
                                                 "__getattr__": lambda self, n: getattr(extract, n)})()
    for path in files:
        t = time.perf_counter()
        audio = decode_audio(str(path))
        t_audio = time.perf_counter()
        enc_before = times["encoder"]
        segments, _ = model.transcribe(audio, beam_size=1, temperature=0.0, condition_on_previous_text=False,
                                       vad_filter=False, language="en")
        list(segments)
        total = time.perf_counter() - t_audio
        times["audio"] += t_audio - t
        times["decoder"] += total - (times["encoder"] - enc_before)
    return times


def breakdown(inputs: list[Path], args, tiny_en: str) -> dict:
    files = [f for p in inputs for f in (audio_files(p) if p.is_dir() else [p])]
    env = child_env(args.threads)
    out = {}
    for system in SYSTEMS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--threads", str(args.threads),
               "--tiny-en", tiny_en, "--engine", args.engine, *map(str, files)]
        runs = [json.loads(measure(cmd, env)[2]) for _ in range(args.breakdown_runs)]
        out[system] = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    return out


def help_time(args) -> float:
    env = child_env(args.threads)
    cmd = [sys.executable, "-m", "whisfusion_cli.cli", "--help"]
    measure(cmd, env)
    return statistics.median(measure(cmd, env)[0] for _ in range(args.help_runs))


# ------------------------------------------------------------------------------------------- report


def _shown(path: Path) -> str:
    """A path as recorded in the results: relative to the repository where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(results: dict) -> None:
    print(f"\ncold start: whole processes, {results['threads']} thread(s), whisfusion --engine {results['engine']}, "
          f"{results['pairs']} interleaved pairs "
          f"per job (medians; ratio = whisfusion / faster-whisper tiny.en int8 greedy)")
    print(f"{'job':<12}{'':<10}{'whisfusion':>12}{'faster-whisper':>16}{'ratio':>8}{'target':>8}")
    for job, r in results["jobs"].items():
        for key, label, unit, value in (("wall", "wall", "s", "wall_s"), ("rss", "peak RSS", "MiB", "peak_rss_mib")):
            a, b = r[value]["whisfusion"], r[value]["faster-whisper"]
            target = TARGETS.get((job, key))
            fmt = ".2f" if unit == "s" else ".0f"
            print(f"{job if key == 'wall' else '':<12}{label:<10}{a:>10{fmt}} {unit:<3}{b:>12{fmt}} {unit:<3}"
                  f"{r[key + '_ratio']:>6.2f}{'<= ' + format(target, 'g') if target else '':>10}")
    print(f"\nbreakdown (s; median of {results['breakdown_runs']} in-process runs with timers)")
    print(f"{'job':<12}{'system':<16}" + "".join(f"{s:>9}" for s in STAGES) + f"{'sum':>9}")
    for job, systems in results["breakdown"].items():
        for system, times in systems.items():
            print(f"{job:<12}{system:<16}" + "".join(f"{times[s]:>9.3f}" for s in STAGES)
                  + f"{sum(times.values()):>9.3f}")
    print(f"\nwhisfusion --help: {results['help_s']:.3f} s (median of {results['help_runs']}; target < {HELP_TARGET_S} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=FOLDER, help="folder of short clips (default: asterisk20)")
    parser.add_argument("--breakdown-runs", type=int, default=3)
    parser.add_argument("--help-runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--engine", default="auto", help="whisfusion's --engine (auto: numpy on the CPU)")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--tiny-en", help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one breakdown run, inside a fresh process
        times = child_whisfusion(args.files, args.threads, args.engine) if args.child == "whisfusion" \
            else child_faster_whisper(args.files, args.threads, args.tiny_en)
        print(json.dumps(times))
        return
    sys.path.insert(0, str(ROOT))
    import compileall

    from whisfusion_cli.whisper_source import tiny_en_dir

    # Byte-compiled, as `pip install` leaves an installed package (faster-whisper's is): an editable checkout
    # under PYTHONDONTWRITEBYTECODE would compile every module in every process.
    compileall.compile_dir(str(ROOT / "whisfusion_cli"), quiet=1)

    tiny_en = str(tiny_en_dir())
    jobs = {"jfk": [JFK], "folder": [args.folder]}
    results = {"threads": args.threads, "engine": args.engine, "pairs": args.pairs, "breakdown_runs": args.breakdown_runs,
               "help_runs": args.help_runs, "folder": _shown(args.folder), "n_folder_files": len(audio_files(args.folder)),
               "jobs": {}, "breakdown": {}}
    for job, inputs in jobs.items():
        results["jobs"][job] = pairs(job, inputs, args, tiny_en)
        results["breakdown"][job] = breakdown(inputs, args, tiny_en)
    results["help_s"] = help_time(args)
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
