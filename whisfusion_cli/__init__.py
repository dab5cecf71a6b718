"""Whisfusion: non-autoregressive speech recognition with a Whisper encoder and a masked-diffusion decoder."""

__version__ = "0.1.0"


def first_line(e: BaseException, limit: int | None = 300) -> str:
    """An exception as one line for our one-line error messages: library errors can span pages, so they are
    cut at `limit` characters; our own messages (limit=None) are kept whole, their hint is at the end."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0].strip()[:limit] if lines else type(e).__name__
