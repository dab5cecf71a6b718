"""The `whisfusion` command line end to end: real speech through `transcribe` into every format, stdout
output, a folder of good and bad files (one line per bad file, exit 1, no partial outputs, resume), option
errors, `--help` without torch, and shell completions that match the app."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from tiny_model import make_model_dir
from whisfusion_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
AUDIO = ROOT / "tests" / "data" / "audio"
CLIPS = sorted(p.name for p in AUDIO.iterdir() if p.suffix in (".wav", ".flac"))
TIME = r"(\d\d):(\d\d):(\d\d)[.,](\d\d\d)"
CUE = re.compile(rf"^{TIME} --> {TIME}$")
HEAVY = ("torch", "transformers", "onnxruntime", "librosa", "huggingface_hub", "soundfile")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_model_dir(tmp_path_factory.mktemp("tiny")))


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def cues(text):
    out = []
    for line in text.splitlines():
        m = CUE.match(line)
        if m:
            g = [int(x) for x in m.groups()]
            out.append((g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000, g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000))
        else:
            assert "-->" not in line, f"malformed cue timing {line!r}"
    return out


def test_help_and_version_do_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from whisfusion_cli.cli import app\n"
        "for args in (['--help'], ['--version'], ['transcribe', '--help'], ['download', '--help'],"
        " ['preprocess', '--help'], ['train', '--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        app(args, prog_name='whisfusion')\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (args, e.code)\n"
        f"print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout.splitlines()[-1]
    assert "whisfusion 0." in proc.stdout


def test_every_command_has_help_with_examples():
    for command in ("transcribe", "download", "preprocess", "train", "bench"):
        result = cli(command, "--help")
        assert result.exit_code == 0 and "Example" in result.stdout, command
    top = cli("--help")
    assert all(c in top.stdout for c in ("transcribe", "download", "preprocess", "train", "bench"))


def test_real_speech_to_every_format(model_dir, tmp_path):
    """Through the installed entry point in a fresh process, like a user would run it."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "whisfusion_cli.cli", "transcribe", str(AUDIO), "--model", model_dir, "-o", str(out),
         "-f", "all", "--seed", "0", "--batch-size", "4", "--strategy", "confidence", "--refine", "2",
         "--shortlist", "16", "--shortlist-int8", "--pad-context", "3", "--max-window", "8", "--split-silence", "0.7",
         "--encoder-backend", "auto"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{len(CLIPS)} transcribed (0 silent)" in proc.stderr and "0 failed" in proc.stderr
    for clip in CLIPS:
        stem = Path(clip).stem
        duration = sf.info(AUDIO / clip).duration
        srt = (out / f"{stem}.srt").read_text()
        vtt = (out / f"{stem}.vtt").read_text()
        assert vtt.startswith("WEBVTT")
        for times in (cues(srt), cues(vtt)):
            assert times, clip
            assert all(a < b for a, b in times) and all(b1 <= a2 for (_, b1), (a2, _) in zip(times, times[1:]))
            assert times[0][0] >= 0 and times[-1][1] <= duration + 0.001
        assert [int(l) for l in srt.splitlines() if l.isdigit()] == list(range(1, len(cues(srt)) + 1))
        doc = json.loads((out / f"{stem}.json").read_text())
        ours = doc["whisfusion"]
        assert ours["file"].endswith(clip) and abs(ours["duration"] - duration) < 0.001
        assert ours["windows"][0]["start"] == 0 and abs(ours["windows"][-1]["end"] - duration) < 0.001
        assert ours["decoding"]["seed"] == 0 and ours["decoding"]["refine"] == 2 and ours["model"] == model_dir
        assert ours["decoding"]["shortlist"] == 16 and ours["decoding"]["shortlist_int8"] is True
        assert ours["decoding"]["pad_context"] == 3
        assert ours["vad"]["max_window_s"] == 8.0 and ours["vad"]["split_silence_s"] == 0.7
        assert ours["encoder"]["backend"] == "torch"  # auto: this test model's encoder is a transformers dir
        assert ours["int8"] is False and ours["encoder"]["int8"] is False  # its config does not ask for int8
        assert all(w["end"] - w["start"] <= 8.0 + 1e-6 for w in ours["windows"])
        # The longest cue, but for a single word (this random model's words are spread over their window).
        assert all(s["end"] - s["start"] <= 7.0 + 1e-6 or " " not in s["text"] for s in doc["segments"])
        assert [(s["start"], s["end"]) for s in doc["segments"]] == [(round(a, 3), round(b, 3)) for a, b in times]
        assert " ".join(s["text"] for s in doc["segments"] if s["text"]) == doc["text"]
        tsv = (out / f"{stem}.tsv").read_text().splitlines()
        assert tsv[0] == "start\tend\ttext" and all(len(r.split("\t")) == 3 for r in tsv)
        assert (out / f"{stem}.txt").read_text().strip().replace("\n", " ") == doc["text"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_stdout_output(model_dir):
    one = cli("transcribe", AUDIO / "jfk.wav", "-m", model_dir, "-q", "--seed", "0")
    assert one.exit_code == 0 and one.stdout.strip() and "==>" not in one.stdout
    two = cli("transcribe", AUDIO / "jfk.wav", AUDIO / "goforward.flac", "-m", model_dir, "-q", "--seed", "0")
    assert two.exit_code == 0
    assert two.stdout.count("==> ") == 2 and one.stdout.strip() in two.stdout
    js = cli("transcribe", AUDIO / "jfk.wav", AUDIO / "goforward.flac", "-m", model_dir, "-q", "-f", "json")
    rows = [json.loads(line) for line in js.stdout.splitlines()]
    assert [Path(r["whisfusion"]["file"]).name for r in rows] == ["jfk.wav", "goforward.flac"]
    assert all(set(r) == {"text", "segments", "language", "whisfusion"} for r in rows)  # whisper's schema
    srt = cli("transcribe", AUDIO / "jfk.wav", "-m", model_dir, "-q", "-f", "srt")
    assert cues(srt.stdout)


def make_mixed_folder(d: Path) -> dict:
    """Good clips, bad files of every kind, and a silent recording; returns {bad name: expected reason}."""
    for name in ("jfk.wav", "cards_002.flac", "forever.flac"):
        shutil.copy(AUDIO / name, d / name)
    (d / "nested").mkdir()
    shutil.copy(AUDIO / "goforward.flac", d / "nested" / "goforward.flac")
    sf.write(d / "silence.wav", np.zeros(20 * 16000, np.float32), 16000)
    bad = {}
    (d / "notes.wav").write_text("meeting notes, not audio\n" * 40)
    bad["notes.wav"] = "not an audio file"
    (d / "empty.flac").write_bytes(b"")
    bad["empty.flac"] = "empty file"
    with wave.open(str(d / "no_samples.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    bad["no_samples.wav"] = "empty audio"
    sf.write(d / "click.wav", np.full(400, 0.3, np.float32), 16000)
    bad["click.wav"] = "too short"
    (d / "broken.mp3").write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + os.urandom(3000))
    bad["broken.mp3"] = "not an audio file"
    (d / "readme.txt").write_text("ignored: not an audio extension")
    return bad


def test_folder_with_good_and_bad_files(model_dir, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    bad = make_mixed_folder(src)
    result = cli("transcribe", src, tmp_path / "missing_dir", "-m", model_dir, "-o", out, "-f", "txt,json")
    assert result.exit_code == 1
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == len(bad) + 1  # one line per bad input, plus the missing path
    for name, reason in bad.items():
        line = [l for l in errors if f"{src / name}:" in l]
        assert len(line) == 1 and reason in line[0], (name, errors)
    assert any("missing_dir: no such file or directory" in l for l in errors)
    assert "note: " in result.stderr and "silence.wav: no speech detected" in result.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name[0] != ".")
    good = ["cards_002", "forever", "jfk", "nested/goforward", "silence"]
    assert written == sorted(f"{g}.{e}" for g in good for e in ("txt", "json"))  # nothing for bad files
    assert json.loads((out / "silence.json").read_text())["text"] == ""
    assert (out / "jfk.txt").read_text().strip()

    # Re-run: finished files are skipped (untouched), the bad ones are still reported.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = cli("transcribe", src, "-m", model_dir, "-o", out, "-f", "txt,json")
    assert again.exit_code == 1 and "5 skipped" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert len([l for l in again.stderr.splitlines() if l.startswith("error: ")]) == len(bad)


def test_default_model_with_the_ctranslate2_encoder(tmp_path):
    pytest.importorskip("ctranslate2")
    texts = {}
    for backend in ("torch", "ctranslate2"):
        out = tmp_path / backend
        # float32 (--no-int8): the int8 encoders of the two backends quantise differently.
        result = cli("transcribe", AUDIO / "jfk.wav", "-o", out, "-f", "json", "--encoder-backend", backend, "-q",
                     "--no-int8")
        assert result.exit_code == 0, result.output
        doc = json.loads((out / "jfk.json").read_text())
        ours = doc["whisfusion"]
        assert ours["encoder"]["backend"] == backend and ours["encoder"]["source"] == "tiny.en"
        assert ours["int8"] is False and ours["encoder"]["int8"] is False
        texts[backend] = doc["text"]
    # The two encoders' states differ by ~1e-4: the same transcript.
    assert texts["torch"] == texts["ctranslate2"] and "country" in texts["torch"]


@pytest.mark.parametrize("args,message", [
    (["-f", "all"], "give --output-dir"),
    (["-f", "docx"], "unknown output format"),
    (["--schedule", "1.0,1.5"], "--schedule"),
    (["--seq-len", "lots"], "--seq-len"),
    (["--selection", "vote"], "--selection"),
    (["--device", "cpu", "--dtype", "bfloat16"], "only supported on a GPU"),
    (["--max-window", "45"], "max window 45 s"),
    (["--split-silence", "0"], "split silence 0 s"),
    (["--pad-context", "some"], "--pad-context"),
    (["--encoder-backend", "onnx"], "--encoder-backend"),
    (["--highlight-words"], "--highlight-words needs --word-timestamps"),
    (["--max-line-count", "2"], "--max-line-count needs --max-line-width"),
])
def test_bad_options_exit_2_with_one_line(args, message):
    result = cli("transcribe", AUDIO / "jfk.wav", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_word_timestamps_and_subtitle_lines_and_a_rerun_with_other_steps(model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["transcribe", AUDIO / "librivox_0890.flac", "-m", model_dir, "-o", out, "-f", "srt,json", "--seed", "0",
            "--word-timestamps", "--max-line-width", "16", "--max-line-count", "2"]
    first = cli(*args, "--steps", "2")
    assert first.exit_code == 0, first.output
    doc = json.loads((out / "librivox_0890.json").read_text())
    words = [w for s in doc["segments"] for w in s["words"]]
    assert words and all(set(w) == {"word", "start", "end", "probability"} for w in words)
    srt = (out / "librivox_0890.srt").read_text()
    blocks = [b.splitlines() for b in srt.strip().split("\n\n")]
    assert all(1 <= len(b) - 2 <= 2 for b in blocks)  # number, timing, at most two lines
    assert all(len(line) <= 16 or " " not in line for b in blocks for line in b[2:])
    assert len(blocks) >= len(doc["segments"]) and " ".join(l for b in blocks for l in b[2:]).split() == \
        " ".join(w["word"] for w in words).split()
    same = cli(*args, "--steps", "2")
    assert "1 skipped" in same.stderr and "note:" not in same.stderr
    other = cli(*args, "--steps", "3")
    assert other.exit_code == 0 and "1 skipped" not in other.stderr
    assert "other settings (decoding.steps 2 -> 3)" in other.stderr
    assert json.loads((out / "librivox_0890.json").read_text())["whisfusion"]["decoding"]["steps"] == 3


def test_unusable_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("transcribe", AUDIO / "jfk.wav", "-m", "whisfusion", "-q")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "not downloaded" in result.stderr and "whisfusion download" in result.stderr
    result = cli("transcribe", AUDIO / "jfk.wav", "-m", "no-such-model", "-q")
    assert result.exit_code == 1 and "unknown model 'no-such-model'" in result.stderr


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_completions", ROOT / "scripts" / "gen_completions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_completions_are_up_to_date_and_parse():
    gen = load_generator()
    assert gen.stale() == [], "run: python scripts/gen_completions.py"
    files = {shell: ROOT / "completions" / name for shell, name in gen.FILES.items()}
    text = files["bash"].read_text()
    for option in ("--output-format", "--batch-size", "--no-vad", "--local-dir"):
        assert option in text
    assert "txt vtt srt tsv json all" in text and "whisfusion-stage1" in text
    checked = 0
    for shell, path in files.items():
        exe = shutil.which(shell)
        if exe:
            proc = subprocess.run([exe, "-n", str(path)], capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, (shell, proc.stderr)
            checked += 1
    assert checked >= 1  # bash is always there


def test_bash_completion_completes():
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    script = ROOT / "completions" / "whisfusion.bash"
    probe = (f"source {script}; COMP_WORDS=(whisfusion transcribe -f s); COMP_CWORD=3; _whisfusion; "
             "echo ${COMPREPLY[@]}; COMP_WORDS=(whisfusion dow); COMP_CWORD=1; _whisfusion; echo ${COMPREPLY[@]}")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30).stdout.splitlines()
    assert out == ["srt", "download"]


def test_ctrl_c_leaves_only_complete_outputs_and_the_rerun_resumes(model_dir, tmp_path):
    import signal
    import time

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    # Enough files that the run cannot finish between our poll and the signal, even on a loaded machine.
    n_files = 150
    for i in range(n_files):
        shutil.copy(AUDIO / "librivox_0890.flac", src / f"take{i:03d}.flac")
    cmd = [sys.executable, "-m", "whisfusion_cli.cli", "transcribe", str(src), "-m", model_dir, "-o", str(out),
           "-f", "json,srt", "--batch-size", "1", "-q"]
    # A shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as an interactive terminal would.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (err, len(list(out.glob("*.json"))))
    assert "interrupted" in err and "resume" in err
    done = sorted(p.stem for p in out.glob("*.json"))
    assert 2 <= len(done) < n_files
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for stem in done:
        json.loads((out / f"{stem}.json").read_text())  # every file that exists is complete
    from whisfusion_cli.writers import record_path

    # To be skipped: the inputs whose record was written (last, after their outputs); a signal between the
    # outputs and the record (the poll above sees a .json just then) leaves an input that is rightly redone.
    skipped = len([s for s in done if record_path(out, s).exists()])
    rerun = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{skipped} skipped" in rerun.stderr and len(list(out.glob("*.json"))) == n_files


# Parameters that set no field of their command's options dataclass, each with what it does instead.
NOT_FIELDS = {
    "transcribe": {"inputs",  # the paths transcribe() takes
                   "quiet"},  # the display only
    "preprocess": {"dataset",  # PreprocessOptions.input (a builtin's name as a parameter)
                   "quiet"},  # PreprocessOptions.progress = not quiet
    "train": {"quiet"},  # TrainOptions.progress = not quiet
    "bench": {"fresh"},  # BenchOptions.resume = not fresh
}
# `download` takes hub.download's arguments and has no options dataclass. The app's own flags: --version, and
# typer's --install-completion / --show-completion.
APP_FLAGS = ["version", "install_completion", "show_completion"]


def _command_fields() -> dict[str, set[str]]:
    import dataclasses

    from whisfusion_cli.bench import BenchOptions
    from whisfusion_cli.data import PreprocessOptions
    from whisfusion_cli.decoding import DecodingOptions
    from whisfusion_cli.encoder import EncoderOptions
    from whisfusion_cli.train import TrainOptions
    from whisfusion_cli.transcribe import TranscribeOptions
    from whisfusion_cli.vad import VadOptions
    from whisfusion_cli.writers import SubtitleOptions

    def names(*classes):
        return {f.name for c in classes for f in dataclasses.fields(c)}

    return {
        "transcribe": names(TranscribeOptions, DecodingOptions, VadOptions, SubtitleOptions),
        # data.preprocess_main fills the encoder spec from encoder_source, encoder_<EncoderOptions field>
        "preprocess": names(PreprocessOptions) | {f"encoder_{n}" for n in names(EncoderOptions) | {"source"}},
        "train": names(TrainOptions),
        "bench": names(BenchOptions),
    }


def test_every_cli_option_maps_to_a_field_of_its_options():
    import typer

    group = typer.main.get_command(app)
    assert [p.name for p in group.params] == APP_FLAGS
    fields = _command_fields()
    assert set(group.commands) == set(fields) | {"download"}
    for name, allowed in fields.items():
        params = {p.name for p in group.commands[name].params}
        assert params - allowed - NOT_FIELDS[name] == set(), name
        assert NOT_FIELDS[name] <= params and not NOT_FIELDS[name] & allowed, name


def test_transcribe_flags_at_their_defaults_are_the_default_options():
    """Every transcribe flag is consumed (an unknown name would fail TranscribeOptions) and the CLI's
    defaults are the Python API's."""
    import typer

    from whisfusion_cli.transcribe import TranscribeOptions, options_from_flags

    command = typer.main.get_command(app).commands["transcribe"]
    flags = {p.name: p.default for p in command.params if p.name not in NOT_FIELDS["transcribe"]}
    assert options_from_flags(**flags) == TranscribeOptions()
    changed = options_from_flags(**{**flags, "steps": 3, "seq_len": "auto", "pad_context": "4", "max_window_s": 20.0,
                                    "max_line_width": 40, "max_segment_s": 5.0, "device": "cpu"})
    assert changed.decoding == {"steps": 3, "seq_len": None, "pad_context": 4}
    assert changed.vad.max_window_s == 20.0 and changed.subtitles.max_line_width == 40
    assert changed.max_segment_s == 5.0 and changed.device == "cpu"
