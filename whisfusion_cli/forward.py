"""The decoder over a batch of canvases, as the decoding loops (decoding.py, upstream.py) run it.

A batch holds W windows of K candidates: rows w*K .. w*K+K-1 of a canvas belong to window w, and the
cross-attention keys/values have one row per window (model.cross_attention folds the K candidates of a window
into one query sequence). Windows of different lengths are padded to the longest canvas (with FILL) and the
longest encoder states; `Ragged` gives the trunk key masks, so no real position attends to padding. The trunk
runs on all rows in one call. The projections onto the whole vocabulary of a step run as one product for the
batch (up to MAX_PROJECTION_ROWS rows), shortlists window by window. Everything else is row-wise, so a window
decodes to the same tokens alone or batched, up to float rounding of the padded and bigger matrix products
(tests/test_decoding_fast.py). On 2 CPU cores, batches of 8 windows decode 1.5-2.4x faster than windows one
at a time (scripts/bench_batch.py).

What `SharedForward` does on top of upstream's forward, without changing a token: the keys/values of a window
are computed once and shared by all candidates and steps; when every candidate has the same input (step 0
masks everything) the trunk runs once per window and is broadcast; only the positions a step needs go through
the output projection. upstream.ReferenceForward is upstream's own forward, for the parity tests.

Host syncs (a GPU's queue drained so the host can read a value): a loop that knows which rows are equal and
which positions it projects says so (`shared`, `Gather`, `_Pass.gathered_logits`, Ragged's lengths kept on
the host), so nothing here reads the device; without that knowledge, `logits`/`argmax` find it from the masks
(tests/test_host_syncs.py counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoding_options import FILL, FILL_INPUT
# Hidden rows projected onto the whole vocabulary in one matrix product: the logits of 512 rows onto 50k tokens
# are 100 MB in float32 (K = 15 canvases of 256 positions would be 0.8 GB at once); more rows go in chunks.
# Peak memory per 30 s window of the 170M preset at K = 1 / 4 / 15 (scripts/bench_decoding.py --memory): 291 /
# 447 / 495 MB, against 301 / 589 / 1689 MB when a window's logits were made whole; the same speed.
MAX_PROJECTION_ROWS = 512
# On a GPU a product of 512 rows leaves most of it idle; 4096 rows onto 50k tokens are 0.4 GB of bf16 logits
# (scripts/gpu_acceptance.sh records the peak memory at K = 1, 4, 15).
GPU_PROJECTION_ROWS = 4096


def projection_rows(device: torch.device) -> int:
    return MAX_PROJECTION_ROWS if device.type == "cpu" else GPU_PROJECTION_ROWS


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor (random draws of the CPU generators) on device without a host sync: a copy from pageable
    memory waits for the GPU's queue, one from pinned memory does not."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class Ragged:
    """Lengths of the windows of a batch padded to a common shape: canvas positions per window [W] and
    encoder frames per window [W] (either None when all are equal), and the same on the host (`known_*`,
    where known), so what is padded is decided without a host sync."""

    lengths: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    known_lengths: list[int] | None = None
    known_frames: list[int] | None = None

    @classmethod
    def of(cls, lengths: list[int] | None, frames: list[int] | None, device) -> "Ragged":
        """The lengths (None: all equal) on the device, copied once, and kept on the host."""
        on_device = (lambda v: None if v is None else to_device(torch.tensor(v), device))
        return cls(on_device(lengths), on_device(frames), lengths, frames)

    def subset(self, windows: list[int]) -> "Ragged":
        pick = (lambda t: None if t is None else t[to_device(torch.tensor(windows), t.device)])
        known = (lambda v: None if v is None else [v[w] for w in windows])
        return Ragged(pick(self.lengths), pick(self.frames), known(self.known_lengths), known(self.known_frames))

    def padded(self, columns: int, frames: int | None) -> tuple:
        """(some row shorter than `columns`, some window with fewer than `frames` states), each None where the
        host does not know (model.key_mask then compares on the device)."""
        below = (lambda v, n: None if v is None or n is None else any(x < n for x in v))
        return below(self.known_lengths, columns), below(self.known_frames, frames)

    def row_lengths(self, K: int, R: int, L: int, device) -> torch.Tensor:
        """Canvas length of each of the R = W*K rows."""
        if self.lengths is None:
            return torch.full((R,), L, dtype=torch.long, device=device)
        return self.lengths.to(device).repeat_interleave(K)


@dataclass
class Gather:
    """A step's masked positions where the caller knows them (the remask loop draws its masks on the host):
    whether the K rows of every window are equal (the trunk then runs once per window), each window's
    positions as (index, repeats), flat into its [K, L] block, or, shared, column indices into its one row
    (repeats K: one row's positions stand for all K rows), and all of them flat into the canvas [W*K*L]."""

    shared: bool
    windows: list
    canvas: torch.Tensor


def gather_rows(hidden, shared, w, K, index):
    """Hidden rows of window w at flat positions `index` (into its [K, L] block, or its one row when shared)."""
    h = hidden[w] if shared else hidden[w * K : (w + 1) * K].flatten(0, 1)
    return h.index_select(0, index)


class SharedForward:
    """The decoder on a batch's canvases [W*K, L] with one set of cross-attention keys/values per window."""

    def __init__(self, decoder, kv, K: int, ragged: Ragged | None = None):
        self.decoder, self.kv, self.K, self.ragged = decoder, kv, K, ragged or Ragged()

    def run(self, x, windows: list[int], ragged: Ragged | None = None, shared: bool | None = None) -> "_Pass":
        """The trunk on the rows of `windows` (indices of the batch's W windows) of x [W*K, L']. shared: whether
        the K rows of every one of those windows are equal, where the caller knows (None: compared here, a
        host sync)."""
        W = x.size(0) // self.K
        hidden, shared, rows = _active_hidden(self.decoder, x, self.kv, self.K, ragged or self.ragged, windows, W,
                                              shared)
        return _Pass(self.decoder, hidden, shared, self.K, rows)

    def argmax(self, x, m, gather: Gather | None = None):
        """Every masked position's argmax over the whole vocabulary (elsewhere 0), [W*K, L]. gather: m's
        positions where the caller knows them (no host sync); None: found from m here."""
        W = x.size(0) // self.K
        if gather is None:
            hidden, shared = _hidden(self.decoder, x, self.kv, self.K, self.ragged)
            parts = [window_hidden(hidden, shared, w, self.K, m[w * self.K : (w + 1) * self.K]) for w in range(W)]
        else:
            hidden, shared = _hidden(self.decoder, x, self.kv, self.K, self.ragged, gather.shared)
            parts = [(gather_rows(hidden, shared, w, self.K, index), repeats)
                     for w, (index, repeats) in enumerate(gather.windows)]
        _, p = best_tokens(self.decoder, torch.cat([h for h, _ in parts]))
        sizes = [h.size(0) for h, _ in parts]
        picks = torch.cat([q.repeat(repeats) if repeats > 1 else q for q, (_, repeats) in zip(p.split(sizes), parts)])
        pred = torch.zeros_like(x)
        if gather is None:
            pred[m] = picks
            return pred
        return pred.view(-1).index_copy_(0, gather.canvas, picks).view_as(x)

    def confident(self, x, shared: bool | None = None):
        """(max softmax probability, argmax) of every position, both [W*K, L] (upstream scores whole canvases).
        shared: whether the K rows of every window are equal, where the caller knows (None: compared here)."""
        R, L = x.shape
        W = R // self.K
        hidden, shared = _hidden(self.decoder, x, self.kv, self.K, self.ragged, shared)
        c, p = best_tokens(self.decoder, hidden.reshape(-1, hidden.size(-1)), confidence=True)
        shape = (W, 1, L) if shared else (W, self.K, L)
        return c.view(shape).expand(W, self.K, L).reshape(R, L), p.view(shape).expand(W, self.K, L).reshape(R, L)


class _Pass:
    """The trunk's hidden states of some windows (SharedForward.run), to be projected."""

    def __init__(self, decoder, hidden, shared, K, rows):
        self.decoder, self.hidden, self.shared, self.K, self.rows = decoder, hidden, shared, K, rows

    def select(self, m):
        """The rows of m [W*K, L] that belong to the windows this pass ran on."""
        return m if self.rows is None else m[self.rows]

    def logits(self, m, windows, shortlists=None, project=None) -> dict:
        """{j: logits} of the masked positions m (bool, the pass's rows) of the pass's windows j in `windows`."""
        return masked_logits(self.decoder, self.hidden, self.shared, self.K, m, windows, shortlists, project)

    def gathered_logits(self, positions: dict, shortlists=None) -> dict:
        """{j: logits} at given positions of the pass's windows j: positions[j] = (index, repeats), flat
        indices into window j's [K, L'] block (row-major), or into its one row when the pass is shared
        (logits repeated `repeats` times). Fixed shapes, so no host sync (unlike `logits`' masks)."""
        rows = [(j, gather_rows(self.hidden, self.shared, j, self.K, index), repeats)
                for j, (index, repeats) in positions.items()]
        return _project(self.decoder, rows, shortlists, None, self.hidden.device)


def _hidden(decoder, x, kv, K, ragged: Ragged | None = None, shared: bool | None = None):
    """Trunk on x [W*K, L] -> (hidden, shared). shared: the K rows of every window are identical (step 0
    masks everything), so the trunk ran once per window and hidden is [W, L, d] (exact, K times cheaper);
    given by the caller where it knows (None: compared here)."""
    W = x.size(0) // K
    lengths, frames = (ragged.lengths, ragged.frames) if ragged is not None else (None, None)
    if lengths is not None:
        x = x.masked_fill(x == FILL, FILL_INPUT)
        lengths = lengths.to(x.device)
    frames = frames.to(x.device) if frames is not None else None
    xr = x.view(W, K, -1)
    padded = ragged.padded(x.size(1), kv[0][0].size(2) if kv is not None else None) if ragged else (None, None)
    if shared is None:
        shared = K > 1 and torch.equal(xr, xr[:, :1].expand_as(xr))
    if K > 1 and shared:
        if kv is not None and kv[0][0].size(0) == W * K:  # keys/values given per candidate
            kv = [(k[::K], v[::K]) for k, v in kv]
        return decoder.hidden_states(xr[:, 0], cross_kv=kv, lengths=lengths, frames=frames, padded=padded), True
    if lengths is not None:
        lengths = lengths.repeat_interleave(K)
    if frames is not None and kv is not None and kv[0][0].size(0) == W * K:
        frames = frames.repeat_interleave(K)
    return decoder.hidden_states(x, cross_kv=kv, lengths=lengths, frames=frames, padded=padded), False


def _active_hidden(decoder, x, kv, K, ragged: Ragged, active: list[int], W: int, shared: bool | None = None):
    """_hidden for the windows `active` only (those still being decoded): (hidden, shared, rows), where
    hidden is indexed by position in `active` and rows selects their rows of x (None: all windows)."""
    if len(active) == W:
        return (*_hidden(decoder, x, kv, K, ragged, shared), None)
    rows = to_device(torch.tensor([w * K + k for w in active for k in range(K)]), x.device)
    per_window = kv is not None and kv[0][0].size(0) == W
    index = to_device(torch.tensor(active), x.device) if per_window else rows
    kv = None if kv is None else [(k[index], v[index]) for k, v in kv]
    return (*_hidden(decoder, x[rows], kv, K, ragged.subset(active), shared), rows)


def window_hidden(hidden, shared, w, K, positions=None):
    """(hidden rows of window w, repeats): the rows to project for its positions (bool [K, L], row-major
    order; None: every position of its K rows, [K, L, d]); repeats > 1 when the K rows are shared and equal,
    so only one row's positions are given and its logits are to be repeated K times."""
    if shared:
        h = hidden[w]
        if positions is None:
            return h, 1
        if torch.equal(positions, positions[:1].expand_as(positions)):
            return h[positions[0]], K
        return h.expand(K, *h.shape)[positions], 1
    h = hidden[w * K : (w + 1) * K]
    return (h if positions is None else h[positions]), 1


def masked_logits(decoder, hidden, shared, K, m, windows, shortlists, project=None):
    """{w: logits [n_w, V or V_w]} of the masked positions m [W*K, L] of each window in `windows`: onto its
    shortlist's rows where it has one, else onto the whole vocabulary (through `project`, default the
    decoder's), those in one product for the batch (a bigger matrix product reads the 77 MB token table of a
    Whisper decoder once, not once per window)."""
    rows = [(w, *window_hidden(hidden, shared, w, K, m[w * K : (w + 1) * K])) for w in windows]
    return _project(decoder, rows, shortlists, project, hidden.device)


def _project(decoder, rows, shortlists, project, device) -> dict:
    """{w: logits} of hidden rows [(w, rows [n_w, d], repeats)]: onto window w's shortlist where it has one,
    else onto the whole vocabulary (through `project`, default the decoder's) in chunks of at most
    projection_rows(device) rows for the batch; logits repeated `repeats` times."""
    project = project or decoder.project
    out, full = {}, []
    for w, h, repeats in rows:
        short = shortlists[w] if shortlists is not None else None
        if short is not None:
            logits = h @ short[1].T
            out[w] = logits.repeat(repeats, 1) if repeats > 1 else logits
        else:
            full.append((w, h, repeats))
    start, limit = 0, projection_rows(device)
    while start < len(full):  # chunks of at most `limit` rows (always at least one window)
        end, count = start, 0
        while end < len(full) and (end == start or count + full[end][1].size(0) <= limit):
            count += full[end][1].size(0)
            end += 1
        chunk = full[start:end]
        logits = project(torch.cat([h for _, h, _ in chunk]) if len(chunk) > 1 else chunk[0][1])
        for (w, h, repeats), part in zip(chunk, logits.split([h.size(0) for _, h, _ in chunk])):
            out[w] = part.repeat(repeats, 1) if repeats > 1 else part
        start = end
    return out


def best_tokens(decoder, rows, confidence: bool = False):
    """(max softmax probability or None, argmax) over the whole vocabulary for hidden rows [n, d], projected
    MAX_PROJECTION_ROWS rows at a time (GPU_PROJECTION_ROWS on a GPU): the same values as one product
    (softmax and argmax are row-wise), but the logits of K x 256 positions onto 32-50k tokens (0.5-0.8 GB at
    K = 15) never exist at once."""
    confs, preds = [], []
    for chunk in rows.split(projection_rows(rows.device)):
        logits = decoder.project(chunk)
        if confidence:
            c, p = torch.softmax(logits.float(), dim=-1).max(-1)
            confs.append(c)
        else:
            p = logits.argmax(-1)
        preds.append(p)
    return (torch.cat(confs) if confidence else None), torch.cat(preds)  # split gives one chunk even of no rows
