"""decoding.py's confidence strategy for one window in numpy, on numpy_model.NumpyDecoder: the torch-free CPU
engine's decoding loop.

It is the loop of decoding._confidence_unmask for one window and one candidate (the default of every
released model on the CPU): the commit schedule, repeat deferral, pad context, the vocabulary shortlist and
mask-predict refinement, step for step the same rules (see the policies there for why each exists), the
same tokens (tests/test_numpy_engine.py decodes the same windows with both). What it does not run, the
torch engine does: several candidates, the upstream remask strategy, the int8 shortlist.
"""

from __future__ import annotations

import numpy as np

from .decoding_options import DecodingOptions, DecodingResult, text_tokens
from .numpy_model import NumpyDecoder, log_softmax, softmax

FILL = -1  # forward.FILL: a canvas position past a window's end (a single window has none)


def unsupported(options: DecodingOptions) -> str | None:
    """Why this loop cannot run `options` (the torch engine can), or None."""
    if options.strategy != "confidence":
        return f"the {options.strategy!r} strategy"
    if options.candidates != 1:
        return f"{options.candidates} candidates"
    if options.shortlist_int8:
        return "the int8 shortlist"
    return None


class _Window:
    """One window being decoded: its canvas, confidences, cross-attention keys/values and shortlist."""

    def __init__(self, decoder: NumpyDecoder, states: np.ndarray, L: int, prefix: list[int], pad_id: int):
        self.decoder, self.P, self.pad_id = decoder, len(prefix), pad_id
        self.mask_id = decoder.mask_token_id
        self.kv = decoder.cross_kv(states)
        self.canvas = np.full(L, self.mask_id, dtype=np.int64)
        self.canvas[: self.P] = prefix
        self.confidences = np.zeros(L, dtype=np.float32)
        self.confidences[: self.P] = 1.0
        self.shortlist: tuple[np.ndarray, np.ndarray] | None = None  # (token ids, output rows)

    def logits(self, x: np.ndarray, columns: int, positions: np.ndarray, top: int):
        """(logits at `positions` of canvas x, the token id of each logit column or None for the whole
        vocabulary), the trunk on the first `columns` of x. Scored on the shortlist once there is one; the
        first call scores the whole vocabulary and, with `top` > 0, makes the shortlist (Shortlist)."""
        hidden = self.decoder.hidden_states(x[:columns], self.kv)[positions]
        if self.shortlist is not None:
            return hidden @ self.shortlist[1].T, self.shortlist[0]
        logits = self.decoder.project(hidden)
        if top:
            ids = np.argpartition(-logits, min(top, logits.shape[1]) - 1, axis=1)[:, :top].ravel()
            ids = np.unique(np.append(ids, self.pad_id))
            self.shortlist = (ids, self.decoder.output_rows(ids))
        return logits, None


def decode_window(decoder: NumpyDecoder, states: np.ndarray, options: DecodingOptions, prefix: list[int],
                  pad_id: int, duration: float | None, alignment_heads=None) -> DecodingResult:
    """One window's encoder states [F, d] -> its DecodingResult (K = 1), as decoding.decode_windows gives."""
    reason = unsupported(options)
    if reason is not None:
        raise ValueError(f"the numpy engine does not run {reason}; use --engine torch")
    window = _Window(decoder, states, options.canvas_length(duration, len(prefix)), list(prefix), pad_id)
    _unmask(window, options)
    for r in range(options.refine):
        share = options.refine_fraction * (options.refine - r) / options.refine
        _refine_pass(window, share, options.pad_context, options.shortlist)
    result = _result(window, options)
    if alignment_heads:
        result.alignment = _alignment(window, result, alignment_heads)
    return result


def _unmask(window: _Window, options: DecodingOptions) -> None:
    """decoding._confidence_unmask for one row: commit the most confident predictions step by step."""
    P, steps, keep = window.P, options.steps, options.pad_context
    L = len(window.canvas)
    n_gen = L - P
    for s in range(steps):
        canvas = window.canvas
        masked = canvas == window.mask_id
        columns = L
        if keep is not None:  # PadContext.narrow
            columns = _window_end(canvas, window.pad_id, keep)
            n_gen = columns - P
        target = n_gen if s == steps - 1 else (n_gen * (s + 1) + steps - 1) // steps  # CommitSchedule.plan
        todo = target - (n_gen - int(masked[P:].sum()))
        if not masked.any():
            break
        if todo <= 0:
            continue
        positions = np.flatnonzero(masked)
        logits, vocabulary = window.logits(canvas, columns, positions, options.shortlist)
        logp = log_softmax(logits)
        picks = logp.argmax(-1)
        pred = np.full(L, window.mask_id, dtype=np.int64)
        pred[positions] = picks if vocabulary is None else vocabulary[picks]
        scores = np.full(L, -1.0, dtype=np.float32)
        scores[positions] = np.exp(np.take_along_axis(logp, picks[:, None], 1)[:, 0])
        if options.repeat_penalty > 0:  # RepeatDeferral.rescore
            dup = masked & ((pred == _shift(canvas, 1, FILL)) | (pred == _shift(canvas, -1, FILL)))
            scores = np.where(dup, scores * np.float32(1.0 - options.repeat_penalty), scores)
        commit = masked & (_ranks(scores, descending=True) < max(todo, 0))  # CommitSchedule.commit
        if options.repeat_penalty > 0 and s != steps - 1:  # RepeatDeferral.commit
            pair = commit[:-1] & commit[1:] & (pred[:-1] == pred[1:])
            drop_left = pair & (scores[:-1] < scores[1:])
            drop_right = pair & ~drop_left
            commit[:-1] &= ~drop_left
            commit[1:] &= ~drop_right
        if keep is not None and s == 0:  # PadContext.commit
            end = (pred == window.pad_id) | (canvas == FILL)
            start = L - _trailing_run(end)
            commit |= masked & (np.arange(L) >= start + keep)
        window.canvas = np.where(commit, pred, canvas)
        window.confidences = np.where(commit, np.maximum(scores, 0), window.confidences).astype(np.float32)


def _refine_pass(window: _Window, share: float, keep: int | None, top: int) -> None:
    """decoding._refine_pass for one row: re-mask the least confident `share` of the transcript and every
    parallel-duplicate signature, and predict them again with everything else known."""
    canvas, P = window.canvas, window.P
    L = len(canvas)
    is_pad = canvas == window.pad_id
    pads = np.flatnonzero(is_pad[P:])
    first_pad = int(pads[0]) if len(pads) else L - P
    # float32, as torch computes it: ceil(0.3 * 10) is 4 there, not 3
    n_row = max(1, int(np.ceil(np.float32(first_pad) * np.float32(share))))
    c = window.confidences.copy()
    c[:P] = np.inf
    m = (_ranks(c) < n_row) | _duplicates(canvas, is_pad, P)
    columns = L if keep is None else _window_end(canvas, window.pad_id, keep)
    m &= np.arange(L) < columns
    positions = np.flatnonzero(m)
    if not len(positions):
        return
    x = np.where(m, window.mask_id, canvas)
    logits, vocabulary = window.logits(x, columns, positions, top)
    probs = softmax(logits)
    picks = probs.argmax(-1)
    window.canvas = canvas.copy()
    window.canvas[positions] = picks if vocabulary is None else vocabulary[picks]
    window.confidences = window.confidences.copy()
    window.confidences[positions] = np.take_along_axis(probs, picks[:, None], 1)[:, 0]


def _result(window: _Window, options: DecodingOptions) -> DecodingResult:
    canvas, confidences, P = window.canvas, window.confidences, window.P
    valid = canvas != window.pad_id
    score = np.float32((confidences * valid).sum(dtype=np.float32) / max(int(valid.sum()), 1))
    text = text_tokens(canvas.tolist(), P, window.pad_id)
    return DecodingResult(tokens=canvas[None], confidences=confidences[None], scores=np.array([score]),
                          selected=0, text_tokens=text, score=float(score),
                          n_canvas_tokens=len(canvas) * options.steps,
                          token_confidences=confidences[P : P + len(text)].tolist())


def _alignment(window: _Window, result: DecodingResult, chosen) -> np.ndarray:
    """decoding._align for one window: the alignment heads' cross-attention over the final canvas (prefix,
    chosen text, end of text and the padding after it), [heads, P + len(text) + 1, F]."""
    P, text = window.P, result.text_tokens
    canvas = list(window.canvas[:P]) + text + [window.pad_id] * max(1, result.seq_len - P - len(text))
    weights = window.decoder.alignment_weights(np.array(canvas, dtype=np.int64), chosen, window.kv)
    return weights[:, : P + len(text) + 1]


# ----------------------------------------------------------------------------------------------------------
# Helpers (decoding.py's, for one row)


def _shift(x: np.ndarray, by: int, fill) -> np.ndarray:
    """x moved `by` places right (left when negative), `fill` where nothing moved in."""
    out = np.full_like(x, fill)
    if by > 0:
        out[by:] = x[:-by]
    else:
        out[:by] = x[-by:]
    return out


def _ranks(values: np.ndarray, descending: bool = False) -> np.ndarray:
    """Rank of every entry in sort order (0: the first; ties by position)."""
    order = np.argsort(-values if descending else values, kind="stable")
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(len(values))
    return ranks


def _trailing_run(flags: np.ndarray) -> int:
    """Length of the run of True at the end of flags."""
    false = np.flatnonzero(~flags)
    return len(flags) - (int(false[-1]) + 1 if len(false) else 0)


def _window_end(canvas: np.ndarray, pad_id: int, keep: int) -> int:
    """The columns the trunk runs on with pad_context `keep`: `keep` after the start of the trailing run of
    committed end-of-text."""
    L = len(canvas)
    return min(L, L - _trailing_run((canvas == pad_id) | (canvas == FILL)) + keep)


def _duplicates(canvas: np.ndarray, is_pad: np.ndarray, P: int) -> np.ndarray:
    """Every token equal to its left neighbour, and both tokens of a pair equal to the pair before it."""
    left = _shift(canvas, 1, FILL)
    dup = (canvas == left) & ~is_pad
    pair_end = (canvas == _shift(canvas, 2, FILL)) & (left == _shift(canvas, 3, FILL)) & ~is_pad
    dup |= pair_end | _shift(pair_end, -1, False)
    dup[:P] = False
    return dup
