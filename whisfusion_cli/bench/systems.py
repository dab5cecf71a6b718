"""The systems bench compares, each behind `transcribe(audio) -> Hypothesis`, timed by stage:

* `WhisfusionSystem`: the driver `whisfusion transcribe` runs (transcribe.Transcriber: VAD windows,
  encoder, Parallel Diffusion Decoding, segments, text), so bench measures what users run;
* `WhisperSystem`: a Whisper checkpoint through transformers `generate`;
* `FasterWhisperSystem`: faster-whisper (CTranslate2).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE, InputFile
from ..display import Reporter
from .memory import sync
from .options import BenchError, BenchOptions, SystemSpec, decoding_overrides


@dataclass
class Hypothesis:
    """One system's output for one utterance, with the time spent in each stage (seconds)."""

    text: str
    encoder_s: float | None  # features + encoder (None where the engine cannot separate it)
    decoder_s: float | None
    canvas_tokens: int  # upstream's "tokens": canvas length (Whisfusion) or generated tokens (AR)
    emitted_tokens: int  # text tokens in the output
    positions: int = 0  # Whisfusion: candidates x canvas x steps positions the decoder filled


def device_dtype(options: BenchOptions):
    """(torch.device, torch.dtype) the same way `whisfusion transcribe` resolves them."""
    from ..devices import resolve_device

    try:
        return resolve_device(options.device, options.dtype)
    except ValueError as e:
        raise BenchError(str(e)) from None


class StageMeter(Reporter):
    """What the transcription driver reports of one clip: seconds in the encoder (features included) and in
    the decoder, each read after waiting for the device, and the tokens the decoder made."""

    def __init__(self, device: str):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.seconds = {"encode": 0.0, "decode": 0.0}
        self.canvas_tokens = self.emitted_tokens = self.positions = 0

    @contextlib.contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[stage] += time.perf_counter() - t0

    def decoded(self, results: list) -> None:
        self.canvas_tokens += sum(r.seq_len for r in results)
        self.emitted_tokens += sum(len(r.text_tokens) for r in results)
        self.positions += sum(r.n_canvas_tokens for r in results)


class WhisfusionSystem:
    """Whisfusion exactly as `whisfusion transcribe` runs it: its driver (transcribe.Transcriber) over one
    clip at a time: VAD windows of at most 30 s, silent windows skipped, the frozen Whisper encoder, Parallel
    Diffusion Decoding with the model's defaults overridden by the spec, window i of a clip seeded with
    seed + i, and the text of the segments."""

    def __init__(self, spec: SystemSpec, options: BenchOptions):
        from ..loading import Pipeline
        from ..transcribe import TranscribeOptions, Transcriber

        device, _ = device_dtype(options)
        int8 = {"1": True, "0": False}.get(spec.params.get("int8"))  # absent: the model's choice, as transcribe
        try:
            # The engine, device and options resolved as `whisfusion transcribe` resolves them.
            pipeline = Pipeline.load(TranscribeOptions(
                model=None if spec.model == "default" else spec.model, device=options.device, dtype=options.dtype,
                threads=options.threads,
                int8=int8, encoder_backend=spec.params.get("encoder_backend"), engine=spec.params.get("engine", "auto"),
                decoding=decoding_overrides(spec)), encoder_options=self._encoder_mode(spec))
        except ValueError as e:
            raise BenchError(f"system {spec.text!r}: {e}") from None
        model = pipeline.model
        self.device = str(device)
        self.meter = StageMeter(self.device)
        # Every utterance of a dataset is scored, however short (transcribe refuses clips under 0.1 s).
        self.driver = Transcriber(TranscribeOptions(min_duration_s=0.0), pipeline, reporter=self.meter)
        self.spec = spec
        self.info = {"decoding": pipeline.decoding.to_dict(), "model_name": model.name,
                     "encoder": model.encoder.describe(), "int8": model.int8, "engine": model.engine}

    @staticmethod
    def _encoder_mode(spec: SystemSpec) -> dict:
        return {"mode": spec.params["encoder_mode"]} if "encoder_mode" in spec.params else {}

    def transcribe(self, audio: np.ndarray) -> Hypothesis:
        from ..transcribe import STATUS_ERROR

        self.meter.reset()
        (result,) = self.driver.run([InputFile("<utterance>", "utterance", audio)])
        if result.status == STATUS_ERROR:
            raise BenchError(f"system {self.spec.text!r}: {result.error}")
        m = self.meter
        return Hypothesis(result.text, m.seconds["encode"], m.seconds["decode"], canvas_tokens=m.canvas_tokens,
                          emitted_tokens=m.emitted_tokens, positions=m.positions)


class WhisperSystem:
    """A Whisper checkpoint through transformers `generate` (greedy, or beam search with beams=N); audio over
    30 s goes through transformers' sequential long-form decoding. Encoder time is taken with hooks on the
    encoder module, so it is separated from decoding in both cases."""

    def __init__(self, spec: SystemSpec, options: BenchOptions):
        from transformers import WhisperFeatureExtractor

        from ..whisper_source import WhisperLoadError, load_whisper, load_whisper_tokenizer

        device, self.dtype = device_dtype(options)
        self.device = str(device)
        try:
            self.model = load_whisper(spec.model, device=device, dtype=self.dtype)
            self.tokenizer = load_whisper_tokenizer(spec.model)
        except (WhisperLoadError, OSError, ValueError) as e:
            raise BenchError(f"system {spec.text!r}: {str(e).splitlines()[0]}") from None
        self.beams = int(spec.params.get("beams", 1))
        self.features = WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins)
        self.eot = int(self.model.generation_config.eos_token_id)
        self.gen_kwargs: dict[str, Any] = {"num_beams": self.beams, "do_sample": False}
        if getattr(self.model.generation_config, "is_multilingual", False):
            self.gen_kwargs.update(language="en", task="transcribe")
        self._encoder_s = 0.0
        encoder = self.model.get_encoder()
        encoder.register_forward_pre_hook(self._encoder_start)
        encoder.register_forward_hook(self._encoder_end)
        self.info = {"beams": self.beams, "engine": "transformers"}

    def _encoder_start(self, module, args):
        sync(self.device)
        self._t_enc = time.perf_counter()

    def _encoder_end(self, module, args, output):
        sync(self.device)
        self._encoder_s += time.perf_counter() - self._t_enc

    def transcribe(self, audio: np.ndarray) -> Hypothesis:
        import torch

        self._encoder_s = 0.0
        t0 = time.perf_counter()
        long_form = len(audio) > 30 * SAMPLE_RATE
        if long_form:
            feats = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False,
                                  padding="longest", return_attention_mask=True)
            extra = {"attention_mask": feats.attention_mask.to(self.device), "return_timestamps": True}
        else:
            feats = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            extra = {}
        features = feats.input_features.to(self.device, self.dtype)
        t_feat = time.perf_counter() - t0
        with torch.inference_mode():
            t1 = time.perf_counter()
            out = self.model.generate(features, **self.gen_kwargs, **extra)
            sync(self.device)
            t2 = time.perf_counter()
        ids = (out.sequences if hasattr(out, "sequences") else out)[0].tolist()
        text_ids = [t for t in ids if t < self.eot]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        encoder_s = t_feat + self._encoder_s
        return Hypothesis(text, encoder_s, (t2 - t1) - self._encoder_s, canvas_tokens=len(text_ids),
                          emitted_tokens=len(text_ids))


class FasterWhisperSystem:
    """faster-whisper (CTranslate2) `transcribe`, greedy unless beams=N, temperature 0 (no fallback), no
    conditioning on previous text, no VAD. Timestamps stay on (the engine's default) because its long-form
    seek relies on them: without, audio over 30 s is cut blindly and the words at the cut are repeated.
    Its feature extractor and `encode` are wrapped with timers to separate encoder time."""

    def __init__(self, spec: SystemSpec, options: BenchOptions):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise BenchError(f"system {spec.text!r}: faster-whisper is not installed "
                             f"(pip install 'whisfusion[baselines]')") from None
        from ..whisper_source import TINY_EN_NAME, WhisperLoadError, tiny_en_dir

        try:
            path = str(tiny_en_dir()) if spec.model == TINY_EN_NAME else spec.model
        except WhisperLoadError as e:
            raise BenchError(f"system {spec.text!r}: {e}") from None
        device, _ = device_dtype(options)
        cuda = device.type == "cuda"
        compute_type = spec.params.get("compute_type", "float16" if cuda else "int8")
        device_index = device.index or 0
        try:
            self.model = WhisperModel(path, device="cuda" if cuda else "cpu", device_index=device_index,
                                      compute_type=compute_type, cpu_threads=options.threads)
        except (ValueError, RuntimeError, OSError) as e:
            raise BenchError(f"system {spec.text!r}: faster-whisper cannot load {path} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.beams = int(spec.params.get("beams", 1))
        self.eot = int(self.model.hf_tokenizer.token_to_id("<|endoftext|>") or 50256)
        self._encoder_s = 0.0
        self.model.encode = _TimedCallable(self.model.encode, self)
        self.model.feature_extractor = _TimedCallable(self.model.feature_extractor, self)
        self.info = {"beams": self.beams, "engine": "faster-whisper", "compute_type": compute_type,
                     "cpu_threads": options.threads}

    def transcribe(self, audio: np.ndarray) -> Hypothesis:
        self._encoder_s = 0.0
        t0 = time.perf_counter()
        segments, _ = self.model.transcribe(
            audio, beam_size=self.beams, temperature=0.0, condition_on_previous_text=False,
            without_timestamps=False, vad_filter=False, language="en",
        )
        segments = list(segments)  # the generator does the work
        total = time.perf_counter() - t0
        tokens = [t for s in segments for t in s.tokens if t < self.eot]
        text = " ".join(s.text.strip() for s in segments if s.text.strip())
        return Hypothesis(text, self._encoder_s, total - self._encoder_s, canvas_tokens=len(tokens),
                          emitted_tokens=len(tokens))


class _TimedCallable:
    """Wraps faster-whisper's feature extractor or its `encode`: calls add to the owner's encoder time,
    attributes (sampling_rate, hop_length, ...) pass through."""

    def __init__(self, inner, owner):
        self._inner, self._owner = inner, owner

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self._inner(*a, **k)
        finally:
            self._owner._encoder_s += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self._inner, name)


SYSTEM_CLASSES = {"whisfusion": WhisfusionSystem, "whisper": WhisperSystem, "faster-whisper": FasterWhisperSystem}
