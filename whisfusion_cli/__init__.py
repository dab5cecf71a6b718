"""Whisfusion: non-autoregressive speech recognition with a Whisper encoder and a masked-diffusion decoder."""

__version__ = "0.1.0"


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line for our one-line error messages (library errors can span pages)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0].strip()[:limit] if lines else type(e).__name__
