"""Whisfusion: non-autoregressive speech recognition with a Whisper encoder and a masked-diffusion decoder."""

__version__ = "0.1.0"
