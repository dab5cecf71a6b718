"""Reading audio: any file -> float32 mono 16 kHz, whole (`load_audio`) or in bounded blocks (`stream_audio`).

soundfile (libsndfile) decodes wav, flac, ogg/vorbis/opus, mp3, aiff and friends; containers libsndfile does
not know (m4a, aac, webm, ...) are decoded by an `ffmpeg` subprocess: the one on PATH, else the binary the
`imageio-ffmpeg` wheel ships (`pip install imageio-ffmpeg`, no system package needed). Resampling to 16 kHz
uses soxr (librosa's resampler) in streaming mode, so a file of hours never sits in memory and a file read in
blocks gives the same samples as one read whole.

Every problem is an `AudioError` whose message is one line naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from . import first_line

# Whisper's audio contract, each derived from the one before.
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds in one encoder window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
ENCODER_FRAMES_PER_SECOND = FRAMES_PER_SECOND // 2  # 50: the encoder's conv stem halves the frame rate

# Containers libsndfile reads itself, and those we hand to ffmpeg.
SOUNDFILE_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd",
     ".caf", ".w64", ".rf64"}
)
FFMPEG_EXTENSIONS = frozenset({".m4a", ".aac", ".mp4", ".m4b", ".webm", ".mka", ".wma", ".amr"})
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | FFMPEG_EXTENSIONS
RESAMPLE_QUALITY = "HQ"  # soxr quality; librosa's default res_type "soxr_hq" is the same resampler
DEFAULT_BLOCK_SECONDS = 30.0
# Native frames read per soundfile call while streaming (at 48 kHz stereo about 2.6 MB of float32).
READ_FRAMES = 1 << 16
FFMPEG_READ_BYTES = READ_FRAMES * 4
GLOB_CHARS = "*?["


class AudioError(Exception):
    """An input that cannot be used as audio; str() is one line: '<path>: <reason>'."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class AudioInfo:
    path: str
    duration: float | None  # seconds; None where only decoding the whole file would tell
    samplerate: int | None
    channels: int | None
    format: str


# ------------------------------------------------------------------------------------------------ reading


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise AudioError(path, "no such file")
    if path.is_dir():
        raise AudioError(path, "is a directory, not an audio file")
    if not os.access(path, os.R_OK):
        raise AudioError(path, "permission denied")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool):
    """Silence what C libraries print to file descriptor 2 (libmpg123 writes 'Note: Illegal Audio-MPEG-Header'
    lines for damaged MP3s); our own one-line error says what went wrong."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _noisy_decoder(path: Path) -> bool:
    return path.suffix.lower() == ".mp3"


def _open_soundfile(path: Path):
    """A soundfile.SoundFile, or None when libsndfile does not recognise the container (try ffmpeg)."""
    import soundfile as sf

    try:
        with _quiet_native_stderr(_noisy_decoder(path)):
            return sf.SoundFile(str(path))
    except sf.LibsndfileError as e:
        # libsndfile gives "Format not recognised" for unknown containers and a variety of messages for
        # broken headers; both may still be something ffmpeg can decode.
        return _SoundfileFailure(first_line(e))
    except (RuntimeError, OSError) as e:
        return _SoundfileFailure(first_line(e))


@dataclass
class _SoundfileFailure:
    message: str


def ffmpeg_executable() -> str | None:
    """ffmpeg on PATH, else the imageio-ffmpeg wheel's binary when that package is installed, else None."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError):
        return None


def _ffmpeg_duration(path: Path) -> float | None:
    """Duration from `ffprobe`, or from the `Duration:` line `ffmpeg -i` prints (imageio-ffmpeg has no ffprobe)."""
    try:
        if shutil.which("ffprobe"):
            out = subprocess.run(
                ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout.strip()
            return float(out)
        exe = ffmpeg_executable()
        if exe:
            # With no output file ffmpeg exits 1 after printing the input's header, which is all we need.
            err = subprocess.run([exe, "-nostdin", "-hide_banner", "-i", str(path)], capture_output=True, text=True,
                                 timeout=60).stderr
            match = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", err)
            if match:
                h, m, sec = match.groups()
                return int(h) * 3600 + int(m) * 60 + float(sec)
    except (subprocess.SubprocessError, ValueError, OSError):
        pass
    return None


def audio_info(path) -> AudioInfo:
    """Duration and format from the header (no decoding for soundfile formats; ffprobe for the others)."""
    path = Path(path)
    _check_readable(path)
    f = _open_soundfile(path)
    if not isinstance(f, _SoundfileFailure):
        with f:
            duration = f.frames / f.samplerate if f.samplerate else None
            return AudioInfo(str(path), duration, f.samplerate, f.channels, f.format)
    duration = _ffmpeg_duration(path)
    if duration is not None:
        return AudioInfo(str(path), duration, None, None, "ffmpeg")
    raise AudioError(path, _not_audio_reason(path, f.message))


def audio_duration(path) -> float | None:
    return audio_info(path).duration


def _not_audio_reason(path: Path, soundfile_message: str) -> str:
    if path.suffix.lower() in FFMPEG_EXTENSIONS and not ffmpeg_executable():
        return f"{path.suffix} files need ffmpeg: apt-get install ffmpeg, or pip install imageio-ffmpeg"
    return f"not an audio file, or corrupt ({soundfile_message})"


def _soundfile_blocks(f, label: str | None = None) -> Iterator[np.ndarray]:
    """Mono float32 blocks at the file's own rate."""
    import soundfile as sf

    path = label or f.name
    quiet = _noisy_decoder(Path(path))
    with f:
        while True:
            try:
                with _quiet_native_stderr(quiet):
                    block = f.read(READ_FRAMES, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise AudioError(path, f"corrupt audio data ({first_line(e)})") from None
            if len(block) == 0:
                return
            yield block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]


def _ffmpeg_blocks(path: Path, sr: int, ffmpeg: str) -> Iterator[np.ndarray]:
    """Mono float32 blocks already at `sr`, decoded and resampled by an ffmpeg subprocess (executable `ffmpeg`)."""
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-ar", str(sr), "-"]
    # stderr goes to a file: a pipe could fill up and block ffmpeg on a file with many decode errors.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        try:
            leftover = b""
            while True:
                chunk = proc.stdout.read(FFMPEG_READ_BYTES)
                if not chunk:
                    break
                chunk = leftover + chunk
                usable = len(chunk) - len(chunk) % 4
                leftover = chunk[usable:]
                if usable:
                    yield np.frombuffer(chunk[:usable], dtype="<f4").astype(np.float32)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if code != 0:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
            last = lines[-1].removeprefix(f"{path}: ")[:200] if lines else f"exit code {code}"
            raise AudioError(path, f"not an audio file, or corrupt (ffmpeg: {last})")


def _rebuffer(blocks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Blocks of exactly `size` samples (the last may be shorter)."""
    pending: list[np.ndarray] = []
    count = 0
    for block in blocks:
        if len(block) == 0:
            continue
        pending.append(block)
        count += len(block)
        if count >= size:
            joined = np.concatenate(pending)
            n_full = len(joined) // size
            for i in range(n_full):
                yield joined[i * size : (i + 1) * size]
            rest = joined[n_full * size :]
            pending, count = ([rest], len(rest)) if len(rest) else ([], 0)
    if count:
        yield np.concatenate(pending)


def _resampled(blocks: Iterable[np.ndarray], sr_in: int, sr_out: int) -> Iterator[np.ndarray]:
    """Stateful streaming resampling: the concatenated output equals resampling the whole signal."""
    if sr_in == sr_out:
        yield from blocks
        return
    import soxr

    stream = soxr.ResampleStream(sr_in, sr_out, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    for block in blocks:
        out = stream.resample_chunk(np.ascontiguousarray(block, dtype=np.float32))
        if len(out):
            yield out
    tail = stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
    if len(tail):
        yield tail


def stream_audio(path, block_seconds: float = DEFAULT_BLOCK_SECONDS, sr: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """float32 mono blocks at `sr` of exactly `block_seconds` (the last may be shorter), decoded lazily:
    memory stays bounded by the block size, whatever the length of the file."""
    path = Path(path)
    _check_readable(path)
    size = max(1, int(round(block_seconds * sr)))
    f = _open_soundfile(path)
    if isinstance(f, _SoundfileFailure):
        ffmpeg = ffmpeg_executable()
        if not ffmpeg:
            raise AudioError(path, _not_audio_reason(path, f.message))
        blocks = _ffmpeg_blocks(path, sr, ffmpeg)
    else:
        if f.samplerate <= 0:
            f.close()
            raise AudioError(path, f"invalid sample rate {f.samplerate}")
        blocks = _resampled(_soundfile_blocks(f), f.samplerate, sr)
    for block in _rebuffer(blocks, size):
        if not np.all(np.isfinite(block)):
            raise AudioError(path, "corrupt audio data (NaN or infinite samples)")
        yield block


def _array_blocks(label: str, samples, size: int) -> Iterator[np.ndarray]:
    """An in-memory signal (16 kHz mono float, shape (n,)) as blocks of `size` samples."""
    samples = np.asarray(samples)
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(label, f"expected a 16 kHz mono float32 array of shape (n,), got {samples.dtype} "
                                f"{samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise AudioError(label, "corrupt audio data (NaN or infinite samples)")
    samples = samples.astype(np.float32, copy=False)
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _file_object_blocks(label: str, f, size: int, sr: int) -> Iterator[np.ndarray]:
    """An open binary file object (wav, flac, ogg, mp3: what libsndfile reads) as blocks at `sr`."""
    import soundfile as sf

    try:
        sound = sf.SoundFile(f)
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError) as e:
        raise AudioError(label, f"not audio that soundfile can read from a file object ({first_line(e)})") from None
    yield from _rebuffer(_resampled(_soundfile_blocks(sound, label), sound.samplerate, sr), size)


def stream_source(source, block_seconds: float = DEFAULT_BLOCK_SECONDS, sr: int = SAMPLE_RATE,
                  label: str | None = None) -> Iterator[np.ndarray]:
    """`stream_audio` for a path, a numpy array (already 16 kHz mono float) or a binary file object."""
    size = max(1, int(round(block_seconds * sr)))
    if isinstance(source, np.ndarray):
        return _array_blocks(label or "array", source, size)
    if hasattr(source, "read"):
        return _file_object_blocks(label or "file object", source, size, sr)
    return stream_audio(source, block_seconds, sr)


def is_memory_source(item) -> bool:
    """A numpy array or an open file object rather than a path."""
    return isinstance(item, np.ndarray) or hasattr(item, "read")


def load_audio(path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The whole file as float32 mono at `sr` (the same samples `stream_audio` yields, concatenated)."""
    blocks = list(stream_audio(path, DEFAULT_BLOCK_SECONDS, sr))
    if not blocks:
        raise AudioError(path, "empty audio (no samples)")
    return np.concatenate(blocks)


# ------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputFile:
    """One audio file to process, and the name its outputs take (relative, without extension). An in-memory
    input (a numpy array or a file object) has a label as its path and the object as its source."""

    path: Path | str
    output_name: str
    source: object = field(default=None, compare=False, repr=False)

    def blocks(self, block_seconds: float = DEFAULT_BLOCK_SECONDS) -> Iterator[np.ndarray]:
        if self.source is None:
            return stream_audio(self.path, block_seconds)
        return stream_source(self.source, block_seconds, label=str(self.path))


def is_audio_path(path) -> bool:
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


def expand_inputs(inputs: Iterable) -> tuple[list[InputFile], list[AudioError]]:
    """Files, directories (searched recursively for audio extensions) and globs -> files in a stable order.

    Each directory's or glob's matches are sorted; inputs keep the order given; a file reached twice is kept
    once. A file named explicitly is taken whatever its extension (it is reported later if it is not audio).
    Outputs of files found under a directory mirror their path below it, so `a/x.wav` and `b/x.wav` do not
    collide; two files that still share a name (x.wav, x.flac) keep their extension in the output name.
    Returns (files, problems) where problems are missing paths and globs that match nothing.
    """
    found: list[tuple[Path, str, str]] = []  # (path, output name, name qualified by its folder)
    problems: list[AudioError] = []
    memory: list[tuple[int, InputFile]] = []  # (inputs before it in `found`, the in-memory input)
    for item in inputs:
        if is_memory_source(item):
            memory.append((len(found), _memory_input(item, len(memory))))
            continue
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and is_audio_path(p))
            if not matches:
                problems.append(AudioError(path, "directory holds no audio files "
                                                 f"({', '.join(sorted(SOUNDFILE_EXTENSIONS)[:6])}, ...)"))
            for p in matches:
                rel = p.relative_to(path).with_suffix("").as_posix()
                found.append((p, rel, f"{path.resolve().name}/{rel}"))
        elif path.exists():
            found.append((path, path.stem, f"{path.resolve().parent.name}/{path.stem}"))
        elif any(c in text for c in GLOB_CHARS):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            files = [p for p in matches if p.is_file() and is_audio_path(p)]
            for d in (p for p in matches if p.is_dir()):
                files += sorted(p for p in d.rglob("*") if p.is_file() and is_audio_path(p))
            if not files:
                problems.append(AudioError(text, "no audio files match this pattern"))
            for p in files:
                found.append((p, p.stem, f"{p.resolve().parent.name}/{p.stem}"))
        else:
            problems.append(AudioError(path, "no such file or directory"))

    seen: set[Path] = set()
    unique, places = [], []
    for i, (p, name, qualified) in enumerate(found):
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((p, name, qualified))
            places.append(i)
    order = [(at, InputFile(u[0], name)) for at, u, name in zip(places, unique, _unique_names(unique))]
    order += [(before - 0.5, f) for before, f in memory]  # memory inputs keep their place among the paths
    return [f for _, f in sorted(order, key=lambda pair: pair[0])], problems


def _memory_input(item, n: int) -> InputFile:
    """An array or file object as an input: labelled by its file name where it has one, else `<array N>`."""
    name = getattr(item, "name", None)
    if isinstance(name, str) and name:
        return InputFile(name, f"{Path(name).stem}_{n}", item)
    kind = "array" if isinstance(item, np.ndarray) else "stream"
    return InputFile(f"<{kind} {n}>", f"{kind}_{n}", item)


def _unique_names(items: list[tuple[Path, str, str]]) -> list[str]:
    """Output names without collisions, deterministic for the same inputs: the plain name; where names
    collide, qualified by the folder; then with the file's extension; then numbered."""
    names = [name for _, name, _ in items]
    for step in ("folder", "extension", "number"):
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        if all(c == 1 for c in counts.values()):
            break
        seen: dict[str, int] = {}
        for i, (p, _, qualified) in enumerate(items):
            if counts[names[i]] == 1:
                continue
            if step == "folder":
                names[i] = qualified
            elif step == "extension":
                names[i] = f"{names[i]}{p.suffix}"
            else:
                k = seen.get(names[i], 0)
                seen[names[i]] = k + 1
                if k:
                    names[i] = f"{names[i]}.{k}"
    return names


__all__ = [
    "AUDIO_EXTENSIONS", "AudioError", "AudioInfo", "CHUNK_LENGTH", "ENCODER_FRAMES_PER_SECOND", "FRAMES_PER_SECOND",
    "HOP_LENGTH", "InputFile", "N_FFT", "N_FRAMES", "N_SAMPLES", "SAMPLE_RATE", "audio_duration", "audio_info",
    "expand_inputs", "is_audio_path", "is_memory_source", "load_audio", "stream_audio", "stream_source",
]
