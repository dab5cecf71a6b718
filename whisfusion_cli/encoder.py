"""Log-mel features + the frozen Whisper encoder: audio windows (<= 30 s) -> encoder states [F, d].

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

import copy
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .audio import CHUNK_LENGTH, ENCODER_FRAMES_PER_SECOND, HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE

if TYPE_CHECKING:  # heavy imports stay inside functions so `whisfusion --help` does not import torch
    import torch
    from transformers import WhisperForConditionalGeneration

# Whisper's audio contract lives in audio.py; the encoder's conv stem halves the mel frame rate.
CONV_STRIDE = 2  # 100 mel frames/s -> ENCODER_FRAMES_PER_SECOND (50)
MAX_ENCODER_FRAMES = N_FRAMES // CONV_STRIDE  # 1500
# Extra encoder frames kept after the audio in "pad_trim"/"short": the decoder sees where speech ends
# (a little padding) instead of a hard cut in the last word.
FRAME_MARGIN = 10
# "short" never runs on less than this, so very short clips still give the decoder some context.
SHORT_MIN_SECONDS = 1.0
SHORT_MIN_MEL_FRAMES = int(SHORT_MIN_SECONDS * SAMPLE_RATE / HOP_LENGTH)

MODES = ("full", "pad_trim", "short")
BACKENDS = ("torch", "ctranslate2", "auto")
DEFAULT_SOURCE = "tiny.en"
DEFAULT_BATCH_SIZE = 8


def frames_for_duration(seconds: float) -> int:
    """Encoder frames kept for `seconds` of audio in "pad_trim" (and run in "short")."""
    # The epsilon keeps float noise (e.g. 2.0000000001 s) from adding a frame.
    return min(MAX_ENCODER_FRAMES, math.ceil(max(0.0, seconds) * ENCODER_FRAMES_PER_SECOND - 1e-6) + FRAME_MARGIN)


def short_mel_frames(num_samples: int) -> int:
    """Mel frames the "short" mode feeds the encoder for a clip of `num_samples` samples (always even)."""
    frames = CONV_STRIDE * frames_for_duration(num_samples / SAMPLE_RATE)
    return min(N_FRAMES, max(SHORT_MIN_MEL_FRAMES, frames))


@dataclass
class EncoderOptions:
    """How audio becomes encoder states."""

    mode: str = "full"  # one of MODES
    int8: bool = False  # torch dynamic int8 quantisation of the encoder's Linear layers (CPU only)
    threads: int | None = None  # torch intra-op threads; None leaves torch's setting alone
    batch_size: int = DEFAULT_BATCH_SIZE  # windows per encoder call
    backend: str = "torch"  # one of BACKENDS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"encoder mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"encoder backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.batch_size < 1:
            raise ValueError(f"encoder batch_size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"encoder threads must be >= 1, got {self.threads}")


class WhisperAudioEncoder:
    """A frozen Whisper encoder with its feature extractor: `.encode(list of audio) -> list of [F_i, d]`."""

    def __init__(
        self,
        model: "str | os.PathLike | WhisperForConditionalGeneration" = DEFAULT_SOURCE,
        options: EncoderOptions | None = None,
        device: "str | torch.device" = "cpu",
        dtype: "torch.dtype | None" = None,
    ):
        import torch
        from transformers import WhisperFeatureExtractor

        self.options = options or EncoderOptions()
        self.device = torch.device(device)
        self.dtype = torch.float32 if dtype is None else dtype
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        if isinstance(model, (str, os.PathLike)):
            from .ct2_import import load_whisper

            self.source = str(model)
            whisper = load_whisper(model, device=self.device, dtype=self.dtype)
        else:
            self.source = getattr(getattr(model, "config", None), "_name_or_path", "") or "<model>"
            whisper = model
        encoder = whisper.get_encoder() if hasattr(whisper, "get_encoder") else whisper
        if not hasattr(encoder, "conv1") or not hasattr(encoder, "embed_positions"):
            raise TypeError(f"{type(model).__name__} is not a transformers Whisper model or encoder")
        if self.options.int8 and self.device.type != "cpu":
            raise ValueError("int8 encoder quantisation is CPU only; use a float dtype on GPU")
        if self.options.int8 and self.dtype != torch.float32:
            raise ValueError("int8 encoder quantisation needs dtype float32")
        # The torch encoder also gives the configuration (and is the fallback of "auto"); where CTranslate2
        # runs the encoder, the torch copy is never run, so it is not quantised.
        self._ct2 = None
        if self.options.backend != "torch":
            self._ct2 = _ctranslate2_encoder(model, self.options, self.device, self.dtype)
        self.backend = "torch" if self._ct2 is None else "ctranslate2"
        if self.options.int8 and self._ct2 is None:
            import warnings

            # A copy, so a model passed in by the caller keeps its float weights. torch warns that its
            # eager quantisation API is deprecated (moving to torchao); it still works in the pinned torch.
            with warnings.catch_warnings():
                for category in (UserWarning, DeprecationWarning, FutureWarning):
                    warnings.simplefilter("ignore", category)
                encoder = torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(encoder).float(), {torch.nn.Linear}, dtype=torch.qint8
                )
        else:
            encoder = encoder.to(device=self.device, dtype=self.dtype)
        self.encoder = encoder.eval().requires_grad_(False)
        self.config = encoder.config
        self.dim: int = int(self.config.d_model)
        self.num_mel_bins: int = int(self.config.num_mel_bins)
        if int(self.config.max_source_positions) != MAX_ENCODER_FRAMES:
            raise ValueError(
                f"{self.source}: encoder has {self.config.max_source_positions} positions, expected "
                f"{MAX_ENCODER_FRAMES} (30 s windows)"
            )
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=self.num_mel_bins,
            sampling_rate=SAMPLE_RATE,
            hop_length=HOP_LENGTH,
            chunk_length=CHUNK_LENGTH,
            n_fft=N_FFT,
        )

    # ------------------------------------------------------------------------------------------ api

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

    def features(self, audio: Sequence[np.ndarray], mel_frames: int = N_FRAMES) -> "torch.Tensor":
        """Log-mel features [B, n_mels, mel_frames]: the first mel_frames of upstream Whisper's input (the
        features of 30 s-padded audio). Fewer frames are computed from less zero padding: a frame reads only
        N_FFT samples around it, and the normalisation's maximum comes from the audio, so the values are the
        same (up to float rounding) at a fraction of the cost for short windows."""
        import torch

        if mel_frames >= N_FRAMES:
            padded, padding = list(audio), "max_length"
        else:
            # Zeros past the audio up to the last sample frame mel_frames - 1 reads, as 30 s padding has.
            n = max([mel_frames * HOP_LENGTH + N_FFT] + [len(a) for a in audio])
            padded, padding = [np.pad(a, (0, n - len(a))) for a in audio], "longest"
        feats = self.feature_extractor(
            padded, sampling_rate=SAMPLE_RATE, return_tensors="np", padding=padding
        ).input_features[:, :, :mel_frames]
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))

    def encode(self, audio: Sequence[np.ndarray]) -> "list[torch.Tensor]":
        """Encoder states, one [F_i, d] tensor per clip (float32 mono 16 kHz, each <= 30 s), in input order,
        on this encoder's device."""
        import torch

        clips = [_check_clip(a, i) for i, a in enumerate(audio)]
        out: list[torch.Tensor | None] = [None] * len(clips)
        if self.options.mode == "short":
            # No padding mask exists in Whisper's encoder, so only clips with the same mel length can share
            # a batch without changing each other's states.
            groups: dict[int, list[int]] = {}
            for i, clip in enumerate(clips):
                groups.setdefault(short_mel_frames(len(clip)), []).append(i)
            batches = [(idx[s : s + self.options.batch_size], m) for m, idx in groups.items()
                       for s in range(0, len(idx), self.options.batch_size)]
        else:
            order = list(range(len(clips)))
            batches = [(order[s : s + self.options.batch_size], N_FRAMES)
                       for s in range(0, len(order), self.options.batch_size)]
        with torch.inference_mode():
            for idx, mel_frames in batches:
                feats = self.features([clips[i] for i in idx], mel_frames)
                states = self._run(feats.to(self.device, self.dtype))
                for row, i in enumerate(idx):
                    out[i] = states[row, : self.output_frames(len(clips[i]))]
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------- internals

    def _run(self, feats: "torch.Tensor") -> "torch.Tensor":
        """Whisper's encoder forward on [B, n_mels, M] features, any even M <= 3000.

        transformers' WhisperEncoder.forward insists on exactly 3000 frames, so the same steps are spelled
        out here (conv stem, GELU, positions, layers, final norm), using the first M/2 position rows.
        """
        import torch.nn.functional as F

        if self._ct2 is not None:
            return self._run_ctranslate2(feats)
        enc = self.encoder
        x = F.gelu(enc.conv1(feats))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]].to(x.dtype)
        for layer in enc.layers:
            x = layer(x, None)
        return enc.layer_norm(x)

    def _run_ctranslate2(self, feats: "torch.Tensor") -> "torch.Tensor":
        import ctranslate2
        import torch

        # CTranslate2 takes features of any even length <= 3000 and uses the first M/2 position rows, as _run.
        array = np.ascontiguousarray(feats.detach().float().cpu().numpy())
        states = self._ct2.encode(ctranslate2.StorageView.from_array(array), to_cpu=True)
        return torch.from_numpy(np.array(states)).to(self.device, self.dtype)


def _ctranslate2_encoder(model: Any, options: EncoderOptions, device: "torch.device", dtype: "torch.dtype"):
    """CTranslate2's Whisper model for `model` (None where "auto" falls back to torch)."""
    import torch

    from .ct2_import import CT2_MODEL_FILE, TINY_EN_NAME, tiny_en_dir

    required = options.backend == "ctranslate2"
    name = str(model) if isinstance(model, (str, os.PathLike)) else None
    if name == TINY_EN_NAME:
        directory = tiny_en_dir()
    elif name is not None and (Path(name).expanduser() / CT2_MODEL_FILE).is_file():
        directory = Path(name).expanduser()
    elif required:
        raise ValueError(f"the ctranslate2 encoder backend needs a CTranslate2 model directory (tiny.en or a "
                         f"directory with {CT2_MODEL_FILE}); {name or type(model).__name__} is not one: use "
                         "backend torch")
    else:
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
    spec: dict[str, Any], device: "str | torch.device" = "cpu", dtype: "torch.dtype | None" = None
) -> WhisperAudioEncoder:
    """Build the encoder a model directory describes, e.g. {"source": "tiny.en", "mode": "short"}.

    Keys: "source" (required: "tiny.en", a model directory or a hub name), any EncoderOptions field, and
    "dim" (checked against the loaded encoder, so a decoder is never paired with the wrong encoder width).
    """
    if not isinstance(spec, dict) or "source" not in spec:
        raise ValueError(f"encoder spec must be a dict with a 'source' key, got {spec!r}")
    option_names = {f.name for f in fields(EncoderOptions)}
    unknown = set(spec) - option_names - {"source", "dim"}
    if unknown:
        raise ValueError(f"encoder spec has unknown keys {sorted(unknown)} (known: source, dim, {', '.join(sorted(option_names))})")
    options = EncoderOptions(**{k: v for k, v in spec.items() if k in option_names})
    encoder = WhisperAudioEncoder(spec["source"], options, device=device, dtype=dtype)
    if "dim" in spec and int(spec["dim"]) != encoder.dim:
        raise ValueError(f"encoder {spec['source']} has width {encoder.dim}, the model expects {spec['dim']}")
    return encoder


__all__ = [
    "BACKENDS",
    "EncoderOptions",
    "FRAME_MARGIN",
    "MODES",
    "WhisperAudioEncoder",
    "frames_for_duration",
    "load_encoder",
    "short_mel_frames",
]
