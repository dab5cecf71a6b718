"""Log-mel features + the frozen Whisper encoder: audio windows (<= 30 s) -> encoder states [F, d].

The features are Whisper's log-mel spectrogram (the filterbank computed here once, the STFT in torch) and
the encoder is model.AudioEncoder, with its weights read straight from the source's file
(whisper_source.open_whisper: the bundled tiny.en's CTranslate2 model.bin, or a transformers directory such as
whisper-small's): neither transformers nor librosa is imported, and no Whisper decoder is ever built.

Three modes trade fidelity to upstream Whisper against speed:
- "full": upstream behaviour; pad to 30 s, return all 1500 frames.
- "pad_trim": pad to 30 s and run the full encoder, then keep the frames that cover the audio (plus a
  small margin of padding), so the decoder attends to fewer frames. Same states as "full" on those frames.
- "short": cut the log-mel to the audio length and run the encoder on that alone with the first F rows
  of the position table. Cost is proportional to audio length; states differ slightly from "full"
  because attention no longer sees the 30 s of padding.

Two backends run the same weights: "torch" (the reference, used for preprocessing and training) and
"ctranslate2" (CTranslate2's Whisper encoder on a CTranslate2 model directory such as the bundled tiny.en:
states within ~2e-4 of torch's; about as fast per window on CPU, see scripts/bench_encoder.py). "auto"
picks ctranslate2 where it is installed and the source is a CTranslate2 directory, torch otherwise.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .audio import CHUNK_LENGTH, ENCODER_FRAMES_PER_SECOND, HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from .choices import ENCODER_BACKENDS, ENCODER_MODES

if TYPE_CHECKING:  # heavy imports stay inside functions so `whisfusion --help` does not import torch
    import torch

    from .whisper_source import WhisperCheckpoint

# Whisper's audio contract lives in audio.py; the encoder's conv stem halves the mel frame rate.
CONV_STRIDE = 2  # 100 mel frames/s -> ENCODER_FRAMES_PER_SECOND (50)
MAX_ENCODER_FRAMES = N_FRAMES // CONV_STRIDE  # 1500
# Extra encoder frames kept after the audio in "pad_trim"/"short": the decoder sees where speech ends
# (a little padding) instead of a hard cut in the last word.
FRAME_MARGIN = 10
# "short" never runs on less than this, so very short clips still give the decoder some context.
SHORT_MIN_SECONDS = 1.0
SHORT_MIN_MEL_FRAMES = int(SHORT_MIN_SECONDS * SAMPLE_RATE / HOP_LENGTH)

DEFAULT_SOURCE = "tiny.en"
DEFAULT_BATCH_SIZE = 8
# Whisper's log-mel: Slaney-scale triangular filters over 0-8 kHz with Slaney area normalisation (librosa's
# filters.mel defaults), power spectrum floored at 1e-10, log10, at most 8 (80 dB) below the clip's maximum,
# then scaled to about [-1, 1].
MEL_FMAX = SAMPLE_RATE / 2
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0


def frames_for_duration(seconds: float) -> int:
    """Encoder frames kept for `seconds` of audio in "pad_trim" (and run in "short")."""
    # The epsilon keeps float noise (e.g. 2.0000000001 s) from adding a frame.
    return min(MAX_ENCODER_FRAMES, math.ceil(max(0.0, seconds) * ENCODER_FRAMES_PER_SECOND - 1e-6) + FRAME_MARGIN)


def padded_frames(seconds: float) -> int:
    """Encoder frames of a clip padded to `seconds` (encode_padded): 50 a second, at most 1500 (30 s)."""
    if not 0 < seconds <= CHUNK_LENGTH:
        raise ValueError(f"a clip is padded to at most {CHUNK_LENGTH} s, not {seconds:g}")
    return math.ceil(seconds * ENCODER_FRAMES_PER_SECOND - 1e-6)


def short_mel_frames(num_samples: int) -> int:
    """Mel frames the "short" mode feeds the encoder for a clip of `num_samples` samples (always even)."""
    frames = CONV_STRIDE * frames_for_duration(num_samples / SAMPLE_RATE)
    return min(N_FRAMES, max(SHORT_MIN_MEL_FRAMES, frames))


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = 3.0 * hz / 200.0
    log = hz >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
    """Whisper's mel filterbank [n_mels, N_FFT // 2 + 1] (float32), computed once per size: what
    openai/whisper stores in mel_filters.npz (librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels))."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(MEL_FMAX), n_mels + 2))
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_hz[:, None]  # [freq, n_mels + 2]
    rising, falling = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (edges[2:] - edges[:-2])  # equal area per filter
    return np.ascontiguousarray(weights.T, dtype=np.float32)


def log_mel_spectrogram(audio: "torch.Tensor", n_mels: int) -> "torch.Tensor":
    """Whisper's log-mel features [B, n_mels, n // HOP_LENGTH] of audio [B, n] (float32, 16 kHz): a centred
    STFT with a Hann window (the last frame dropped), power, mel filters, log10, and each clip clipped to
    DYNAMIC_RANGE below its own maximum."""
    import torch

    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # contiguous: the matmul below is ~8x slower on a view
    mel = torch.from_numpy(mel_filters(n_mels)).to(audio.device) @ power
    log_spec = mel.clamp(min=LOG_FLOOR).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    return (torch.maximum(log_spec, peak - DYNAMIC_RANGE) + 4.0) / 4.0


def log_mel_spectrogram_numpy(audio: np.ndarray, n_mels: int) -> np.ndarray:
    """log_mel_spectrogram in numpy (the torch-free CPU engine): the same features [B, n_mels, n // HOP_LENGTH]
    of audio [B, n] to float rounding (tests/test_numpy_engine.py)."""
    k = np.arange(N_FFT)
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * k / N_FFT)).astype(np.float32)  # periodic Hann, as torch's
    padded = np.pad(np.asarray(audio, dtype=np.float32), ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    n_frames = audio.shape[1] // HOP_LENGTH  # the centred STFT's last frame dropped
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=1)[:, ::HOP_LENGTH][:, :n_frames]
    spectrum = np.fft.rfft(frames * window, axis=-1)  # [B, frames, N_FFT // 2 + 1]
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    log_spec = np.log10(np.maximum(mel_filters(n_mels) @ power.transpose(0, 2, 1), LOG_FLOOR))
    peak = log_spec.max(axis=(1, 2), keepdims=True)
    return (np.maximum(log_spec, peak - DYNAMIC_RANGE) + 4.0) / 4.0


def padded_clips(audio: Sequence[np.ndarray], mel_frames: int = N_FRAMES) -> np.ndarray:
    """The samples whose features are the first mel_frames of upstream Whisper's input (the features of
    30 s-padded audio) [B, n]. Fewer frames are computed from less zero padding: a frame reads only N_FFT
    samples around it, and the normalisation's maximum comes from the audio, so the values are the same (up
    to float rounding) at a fraction of the cost for short windows."""
    if mel_frames >= N_FRAMES:
        n = N_SAMPLES
    else:
        # Zeros past the audio up to the last sample frame mel_frames - 1 reads, as 30 s padding has.
        n = max([mel_frames * HOP_LENGTH + N_FFT] + [len(a) for a in audio])
    padded = np.zeros((len(audio), n), dtype=np.float32)
    for row, clip in zip(padded, audio):
        row[: len(clip)] = clip[:n]
    return padded


@dataclass
class EncoderOptions:
    """How audio becomes encoder states."""

    mode: str = "full"  # one of choices.ENCODER_MODES
    int8: bool = False  # torch dynamic int8 quantisation of the encoder's Linear layers (CPU only)
    threads: int | None = None  # torch intra-op threads; None leaves torch's setting alone
    batch_size: int = DEFAULT_BATCH_SIZE  # windows per encoder call
    backend: str = "torch"  # one of choices.ENCODER_BACKENDS

    def __post_init__(self) -> None:
        if self.mode not in ENCODER_MODES:
            raise ValueError(f"encoder mode {self.mode!r} is not one of {', '.join(ENCODER_MODES)}")
        if self.backend not in ENCODER_BACKENDS:
            raise ValueError(f"encoder backend {self.backend!r} is not one of {', '.join(ENCODER_BACKENDS)}")
        if self.batch_size < 1:
            raise ValueError(f"encoder batch_size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"encoder threads must be >= 1, got {self.threads}")


class _Encoder:
    """What both encoders share: the spec a model directory stores, the frames a clip gives, and which clips
    share an encoder call. Subclasses set source, options, dim, num_mel_bins and backend."""

    source: str
    options: EncoderOptions
    dim: int
    num_mel_bins: int
    backend: str

    def spec(self) -> dict[str, Any]:
        """What a model directory stores to rebuild this encoder with `load_encoder`."""
        return {"source": self.source, "mode": self.options.mode, "dim": self.dim}

    def describe(self) -> dict[str, Any]:
        """What ran: `spec()` and the backend in use (recorded in transcripts' JSON and bench results)."""
        return {**self.spec(), "backend": self.backend, "int8": self.options.int8}

    def output_frames(self, num_samples: int) -> int:
        """Number of state rows `encode` returns for a clip of `num_samples` samples."""
        if self.options.mode == "full":
            return MAX_ENCODER_FRAMES
        if self.options.mode == "pad_trim":
            return frames_for_duration(num_samples / SAMPLE_RATE)
        return short_mel_frames(num_samples) // CONV_STRIDE

    def batches(self, clips: list[np.ndarray], batch_size: int) -> list[tuple[list[int], int]]:
        """(clip indices, mel frames) of each encoder call. No padding mask exists in Whisper's encoder, so in
        "short" mode only clips with the same mel length can share a call without changing each other's
        states; the other modes pad every clip to 30 s."""
        if self.options.mode != "short":
            order = list(range(len(clips)))
            return [(order[s : s + batch_size], N_FRAMES) for s in range(0, len(order), batch_size)]
        groups: dict[int, list[int]] = {}
        for i, clip in enumerate(clips):
            groups.setdefault(short_mel_frames(len(clip)), []).append(i)
        return [(idx[s : s + batch_size], m) for m, idx in groups.items() for s in range(0, len(idx), batch_size)]


class WhisperAudioEncoder(_Encoder):
    """A frozen Whisper encoder with its features: `.encode(list of audio) -> list of [F_i, d]`.

    model: "tiny.en", a CTranslate2 or transformers Whisper directory, a hub name, a whisper_source
    WhisperCheckpoint already open, or a transformers Whisper model or encoder object (its weights are used,
    the object is left alone)."""

    def __init__(
        self,
        model: "str | os.PathLike | WhisperCheckpoint | Any" = DEFAULT_SOURCE,
        options: EncoderOptions | None = None,
        device: "str | torch.device" = "cpu",
        dtype: "torch.dtype | None" = None,
    ):
        import torch

        from .whisper_source import open_whisper

        self.options = options or EncoderOptions()
        self.device = torch.device(device)
        self.dtype = torch.float32 if dtype is None else dtype
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        if self.options.int8 and self.device.type != "cpu":
            raise ValueError("int8 encoder quantisation is CPU only; use a float dtype on GPU")
        if self.options.int8 and self.dtype != torch.float32:
            raise ValueError("int8 encoder quantisation needs dtype float32")
        checkpoint = open_whisper(model)
        self.source = checkpoint.source
        self.dims = checkpoint.encoder_dims()
        self.dim: int = self.dims.n_state
        self.num_mel_bins: int = self.dims.n_mels
        if self.dims.n_ctx != MAX_ENCODER_FRAMES:
            raise ValueError(
                f"{self.source}: encoder has {self.dims.n_ctx} positions, expected {MAX_ENCODER_FRAMES} (30 s windows)"
            )
        # Where CTranslate2 runs the encoder it reads the weights itself: the torch encoder is not built.
        self._ct2 = None
        if self.options.backend != "torch":
            self._ct2 = _ctranslate2_encoder(checkpoint, self.options, self.device, self.dtype)
        self.backend = "torch" if self._ct2 is None else "ctranslate2"
        self.encoder = _build_encoder(checkpoint, self.dims, self.options, self.device, self.dtype) \
            if self._ct2 is None else None

    # ------------------------------------------------------------------------------------------ api

    def features(self, audio: Sequence[np.ndarray], mel_frames: int = N_FRAMES) -> "torch.Tensor":
        """Log-mel features [B, n_mels, mel_frames] of `padded_clips(audio, mel_frames)`."""
        import torch

        padded = padded_clips(audio, mel_frames)
        feats = log_mel_spectrogram(torch.from_numpy(padded), self.num_mel_bins)[:, :, :mel_frames]
        return feats.contiguous()

    def encode(self, audio: Sequence[np.ndarray]) -> "list[torch.Tensor]":
        """Encoder states, one [F_i, d] tensor per clip (float32 mono 16 kHz, each <= 30 s), in input order,
        on this encoder's device."""
        import torch

        clips = [_check_clip(a, i) for i, a in enumerate(audio)]
        out: list[torch.Tensor | None] = [None] * len(clips)
        with torch.inference_mode():
            for idx, mel_frames in self.batches(clips, self.options.batch_size):
                feats = self.features([clips[i] for i in idx], mel_frames)
                states = self._run(feats.to(self.device, self.dtype))
                for row, i in enumerate(idx):
                    out[i] = states[row, : self.output_frames(len(clips[i]))]
        return out  # type: ignore[return-value]

    def encode_padded(self, audio: Sequence[np.ndarray], seconds: float = CHUNK_LENGTH) -> "list[torch.Tensor]":
        """Encoder states of each clip padded with silence to `seconds` (<= 30; 30 is Whisper's own input),
        all padded_frames(seconds) of them, whatever this encoder's mode."""
        import torch

        clips, mel_frames = _padded_input(audio, seconds)
        with torch.inference_mode():
            return [self._run(self.features([clip], mel_frames).to(self.device, self.dtype))[0] for clip in clips]

    # ------------------------------------------------------------------------------------- internals

    def _run(self, feats: "torch.Tensor") -> "torch.Tensor":
        """Whisper's encoder forward on [B, n_mels, M] features, any even M <= 3000 (the first M/2 rows of
        the position table)."""
        if self._ct2 is not None:
            return self._run_ctranslate2(feats)
        return self.encoder(feats)

    def _run_ctranslate2(self, feats: "torch.Tensor") -> "torch.Tensor":
        import ctranslate2
        import torch

        # CTranslate2 takes features of any even length <= 3000 and uses the first M/2 position rows, as _run.
        array = np.ascontiguousarray(feats.detach().float().cpu().numpy())
        states = self._ct2.encode(ctranslate2.StorageView.from_array(array), to_cpu=True)
        return torch.from_numpy(np.array(states)).to(self.device, self.dtype)


class NumpyWhisperEncoder(_Encoder):
    """WhisperAudioEncoder on the torch-free CPU engine: features and encoder in numpy (numpy_model), float32,
    a clip per call (a batch of short clips gains little on a CPU). The same states to float rounding."""

    backend = "numpy"

    def __init__(self, checkpoint: "WhisperCheckpoint", options: EncoderOptions | None = None,
                 weights: dict[str, np.ndarray] | None = None):
        from .numpy_model import NumpyAudioEncoder
        from .whisper_source import ENCODER_PREFIX

        self.options = options or EncoderOptions()
        if self.options.int8:
            raise ValueError("the numpy engine runs the encoder in float32; int8 needs --engine torch")
        if self.options.backend == "ctranslate2":
            raise ValueError("the numpy engine runs its own encoder, not CTranslate2's; use --engine torch for it")
        self.source = checkpoint.source
        self.dims = checkpoint.encoder_dims()
        self.dim, self.num_mel_bins = self.dims.n_state, self.dims.n_mels
        if weights is None:  # else the arrays of an encoder made before (the numpy engine's cache)
            weights = {n[len(ENCODER_PREFIX):]: checkpoint.array(n) for n in checkpoint.names(ENCODER_PREFIX)}
        self.encoder = NumpyAudioEncoder(weights, checkpoint.n_head)

    def encode(self, audio: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Encoder states, one [F_i, d] float32 array per clip (float32 mono 16 kHz, each <= 30 s)."""
        out = []
        for i, a in enumerate(audio):
            clip = _check_clip(a, i)
            mel_frames = N_FRAMES if self.options.mode != "short" else short_mel_frames(len(clip))
            feats = log_mel_spectrogram_numpy(padded_clips([clip], mel_frames), self.num_mel_bins)[0, :, :mel_frames]
            out.append(self.encoder(feats)[: self.output_frames(len(clip))])
        return out

    def encode_padded(self, audio: Sequence[np.ndarray], seconds: float = CHUNK_LENGTH) -> list[np.ndarray]:
        """WhisperAudioEncoder.encode_padded: each clip padded with silence to `seconds` (<= 30)."""
        clips, mel_frames = _padded_input(audio, seconds)
        features = (log_mel_spectrogram_numpy(padded_clips([c], mel_frames), self.num_mel_bins)[0, :, :mel_frames]
                    for c in clips)
        return [self.encoder(f) for f in features]


def _build_encoder(checkpoint: "WhisperCheckpoint", dims, options: EncoderOptions, device: "torch.device",
                   dtype: "torch.dtype") -> "torch.nn.Module":
    """model.AudioEncoder holding the checkpoint's encoder tensors: built without weights (meta device),
    then given the tensors read from the file; int8 replaces its Linear layers in place, so no float copy of
    them stays beside the int8 one."""
    import torch

    from . import first_line
    from .model import AudioEncoder, quantize_linears

    with torch.device("meta"):
        encoder = AudioEncoder(dims)
    try:
        encoder.load_state_dict(checkpoint.encoder_state_dict(), strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{checkpoint.origin}: encoder weights do not fit a Whisper encoder ({first_line(e)})") from None
    encoder = encoder.eval().requires_grad_(False)
    if not options.int8:
        return encoder.to(device=device, dtype=dtype)
    return quantize_linears(encoder)


def _ctranslate2_encoder(checkpoint: "WhisperCheckpoint", options: EncoderOptions, device: "torch.device",
                         dtype: "torch.dtype"):
    """CTranslate2's Whisper model for the checkpoint's CTranslate2 directory (None where "auto" falls back
    to torch)."""
    import torch

    from .ct2 import CT2_MODEL_FILE

    required = options.backend == "ctranslate2"
    directory = checkpoint.ct2_dir
    if directory is None:
        if required:
            raise ValueError(f"the ctranslate2 encoder backend needs a CTranslate2 model directory (tiny.en or a "
                             f"directory with {CT2_MODEL_FILE}); {checkpoint.source} is not one: use backend torch")
        return None
    try:
        import ctranslate2
    except ImportError:
        if required:
            raise ValueError("the ctranslate2 encoder backend needs the ctranslate2 package: "
                             "pip install ctranslate2 (or use backend torch)") from None
        return None
    if device.type == "cuda":
        compute_type = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
        place = {"device": "cuda", "device_index": device.index or 0}
    else:
        compute_type = "int8" if options.int8 else "float32"
        place = {"device": "cpu", "intra_threads": options.threads or torch.get_num_threads()}
    return ctranslate2.models.Whisper(str(directory), compute_type=compute_type, **place)


def _padded_input(audio: Sequence[np.ndarray], seconds: float) -> tuple[list[np.ndarray], int]:
    """encode_padded's checked clips and the mel frames they are padded to."""
    mel_frames = CONV_STRIDE * padded_frames(seconds)
    clips = [_check_clip(a, i) for i, a in enumerate(audio)]
    for i, clip in enumerate(clips):
        if len(clip) > seconds * SAMPLE_RATE:
            raise ValueError(f"audio item {i}: {len(clip) / SAMPLE_RATE:.2f} s does not fit {seconds:g} s of padding")
    return clips, mel_frames


def _check_clip(audio: Any, index: int) -> np.ndarray:
    clip = np.asarray(audio)
    if clip.ndim != 1:
        raise ValueError(f"audio item {index}: expected mono 1-D samples, got shape {clip.shape}")
    if clip.dtype.kind not in "fiu":
        raise ValueError(f"audio item {index}: expected float samples, got dtype {clip.dtype}")
    if len(clip) > N_SAMPLES:
        raise ValueError(
            f"audio item {index}: {len(clip) / SAMPLE_RATE:.2f} s is longer than the encoder's "
            f"{CHUNK_LENGTH} s window; cut long audio into windows first"
        )
    clip = clip.astype(np.float32, copy=False)
    if not np.all(np.isfinite(clip)):
        raise ValueError(f"audio item {index}: contains NaN or infinite samples")
    return clip


def load_encoder(
    spec: dict[str, Any], device: "str | torch.device" = "cpu", dtype: "torch.dtype | None" = None,
    memo: dict | None = None, engine: str = "torch", weights: dict | None = None,
) -> "WhisperAudioEncoder | NumpyWhisperEncoder":
    """Build the encoder a model directory describes, e.g. {"source": "tiny.en", "mode": "short"}.

    Keys: "source" (required: "tiny.en", a model directory or a hub name), any EncoderOptions field, and
    "dim" (checked against the loaded encoder, so a decoder is never paired with the wrong encoder width).
    memo: checkpoints already open (whisper_source.open_whisper), e.g. the one the decoder's token table came from.
    engine: "torch" (WhisperAudioEncoder on device) or "numpy" (NumpyWhisperEncoder, CPU, no torch; weights:
    the arrays of one made before).
    """
    from .whisper_source import open_whisper

    if not isinstance(spec, dict) or "source" not in spec:
        raise ValueError(f"encoder spec must be a dict with a 'source' key, got {spec!r}")
    option_names = {f.name for f in fields(EncoderOptions)}
    unknown = set(spec) - option_names - {"source", "dim"}
    if unknown:
        raise ValueError(f"encoder spec has unknown keys {sorted(unknown)} (known: source, dim, {', '.join(sorted(option_names))})")
    options = EncoderOptions(**{k: v for k, v in spec.items() if k in option_names})
    checkpoint = open_whisper(spec["source"], memo)
    if engine == "numpy":
        encoder = NumpyWhisperEncoder(checkpoint, options, weights)
    else:
        encoder = WhisperAudioEncoder(checkpoint, options, device=device, dtype=dtype)
    if "dim" in spec and int(spec["dim"]) != encoder.dim:
        raise ValueError(f"encoder {spec['source']} has width {encoder.dim}, the model expects {spec['dim']}")
    return encoder


__all__ = [
    "EncoderOptions",
    "FRAME_MARGIN",
    "NumpyWhisperEncoder",
    "WhisperAudioEncoder",
    "frames_for_duration",
    "load_encoder",
    "log_mel_spectrogram",
    "log_mel_spectrogram_numpy",
    "mel_filters",
    "padded_clips",
    "short_mel_frames",
]
