"""Progress bars for long jobs (preprocess, train, transcribe): one look, made in one place."""

from __future__ import annotations


def progress(enabled: bool, console=None, *, counts: bool = True):
    """A Rich progress bar: description, bar, done/total (`counts`) or elapsed time, time remaining.

    Disabled (prints nothing) when `enabled` is false, e.g. under --quiet or when stderr is not a terminal.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    middle = MofNCompleteColumn() if counts else TimeElapsedColumn()
    return Progress(TextColumn("{task.description}"), BarColumn(), middle, TimeRemainingColumn(),
                    disable=not enabled, console=console)
