"""Upstream Whisfusion's decoding loop, exactly, and the hooks the parity tests reproduce an upstream run with.

The loop (the `remask` strategy): K candidates on a canvas of mask tokens with the prefix (BOS) at position
0; at each step every candidate draws fresh uniforms, positions under the step's mask ratio are reset to the
mask token, one forward pass fills the masked positions with their argmax; after the last step the confidence
of every position is its max softmax probability (decoding.py scores and selects the candidates).

`remask` runs on any forward: forward.SharedForward (what `whisfusion transcribe` runs: the same tokens,
faster) or `ReferenceForward`, upstream's own (the condition expanded to K rows, keys/values recomputed at
every step, logits for every position). A `Trace` fixes the masks, records each step's input and picks the
reference forward (tests/test_model_parity.py, scripts/bench_decoding.py); production passes none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .forward import Gather, to_device


@dataclass
class Trace:
    """The reference/test path's hooks into one window's decoding (decoding.decode_traced).

    masks: per-step masks (bool [K, L] each) replacing the random draws of the remask strategy: the way to
    reproduce an upstream run exactly. inputs: a list that receives every step's input canvas (remask).
    reference: decode through upstream's own forward (`ReferenceForward`) instead of the shared one.
    policies: extra confidence-strategy policies (decoding.Policy), run after the commit schedule: experiments
    that are not options.
    """

    masks: list | None = None
    inputs: list | None = None
    reference: bool = False
    policies: list = field(default_factory=list)


class ReferenceForward:
    """Upstream's forward on canvases [W*K, L]: the encoder states expanded to one row per candidate
    (condition_rows [W*K, F, d]), the whole decoder (cross-attention keys/values included) at every step,
    logits for every position. Windows of one canvas length only, no shortlist."""

    def __init__(self, decoder, condition_rows, K: int):
        self.decoder, self.condition, self.K = decoder, condition_rows, K

    def logits(self, x):
        return self.decoder(x, condition=self.condition)

    def run(self, x, windows: list[int], ragged=None, shared=None) -> "_ReferencePass":
        """Every row through the whole decoder; the pass answers for the rows of `windows` (as
        forward.SharedForward.run, which runs those rows only; `shared` is not used: every row runs)."""
        if ragged is not None and (ragged.lengths is not None or ragged.frames is not None):
            raise ValueError("the reference forward decodes windows of one shape only")
        return _ReferencePass(self.logits(x), windows, self.K)

    def argmax(self, x, m, gather=None):
        """Every position's argmax (the loop keeps those of the masked positions m)."""
        return self.logits(x).argmax(-1)

    def confident(self, x, shared=None):
        """(max softmax probability, argmax) of every position."""
        return torch.softmax(self.logits(x).float(), dim=-1).max(-1)


class _ReferencePass:
    """Every row's logits [W*K, L, V], of which `logits` gives the masked positions of some windows."""

    shared = False  # every row has its own logits

    def __init__(self, full, windows: list[int], K: int):
        self.full, self.windows, self.K = full, windows, K

    def select(self, m):
        """The rows of m [W*K, L] that belong to the pass's windows."""
        return m[[r for w in self.windows for r in range(w * self.K, (w + 1) * self.K)]]

    def logits(self, m, windows, shortlists=None, project=None) -> dict:
        """{j: logits} of the masked positions m (bool, the pass's rows) of the pass's windows j in `windows`."""
        if project is not None or (shortlists is not None and any(s is not None for s in shortlists)):
            raise ValueError("the reference forward scores the whole vocabulary (no shortlist)")
        K = self.K
        return {j: self.full[self.windows[j] * K : (self.windows[j] + 1) * K][m[j * K : (j + 1) * K]]
                for j in windows}

    def gathered_logits(self, positions: dict, shortlists=None) -> dict:
        """{j: logits} at positions[j] = (index, 1), flat into window j's [K, L] block, as forward._Pass's."""
        if shortlists is not None and any(s is not None for s in shortlists):
            raise ValueError("the reference forward scores the whole vocabulary (no shortlist)")
        K = self.K
        return {j: self.full[self.windows[j] * K : (self.windows[j] + 1) * K].flatten(0, 1).index_select(0, index)
                for j, (index, _) in positions.items()}


def remask(forward, canvas, valid, P: int, ratios, generators, mask_id: int, trace: Trace | None = None):
    """Upstream's loop on W windows x K candidates -> (canvas, confidences), both [W*K, L].

    canvas: the starting canvases (mask tokens, the prefix in the first P positions, FILL past a window's
    length); valid: bool [W*K, L], the positions of each row's own window. ratios: the mask ratio of every
    step. generators: one per window, each drawing that window's [K, L_w] uniforms per step exactly as a lone
    window would.
    """
    R, L = canvas.shape
    W = len(generators)
    K = R // W
    masks = _step_masks(valid.cpu(), P, ratios, generators, K, trace)  # on the host: one read of `valid`
    plans = _gathers(masks, K, canvas.device)
    masks = to_device(masks, canvas.device)  # one copy for the batch, not one per step
    confidences = torch.zeros(R, L, device=canvas.device)
    for s in range(len(ratios)):
        m = masks[s]
        x = torch.where(m, torch.full_like(canvas, mask_id), canvas)
        if trace is not None and trace.inputs is not None:
            trace.inputs.append(x.clone().cpu())
        if s == len(ratios) - 1:
            confidences, pred = forward.confident(x, plans[s].shared)
        else:  # only the masked positions need a prediction
            pred = forward.argmax(x, m, plans[s])
        canvas = torch.where(m, pred, x)
    return canvas, confidences


def _step_masks(valid, P: int, ratios, generators, K: int, trace: Trace | None):
    """Every step's mask, bool [S, W*K, L] on the host: the trace's, or drawn from the windows' generators,
    each generator's uniforms in the order a lone window draws them ([K, L_w] per step); never the prefix,
    never past a window's length (valid, bool [W*K, L])."""
    L = valid.size(1)
    if trace is not None and trace.masks is not None:
        masks = torch.stack([torch.as_tensor(m, dtype=torch.bool, device="cpu") for m in trace.masks[: len(ratios)]])
    else:
        win_len = valid[::K].sum(1).tolist()
        masks = torch.stack([
            torch.cat([torch.nn.functional.pad(torch.rand(K, n, generator=g), (0, L - n), value=1.0)
                       for g, n in zip(generators, win_len)]) < ratio for ratio in ratios])
    masks[:, :, :P] = False
    return masks & valid


def _gathers(masks, K: int, device) -> list[Gather]:
    """Each step's masked positions (forward.Gather) from the host masks [S, W*K, L], in one copy to the
    device, so no step syncs the host. The K rows of every window are known equal at the first step (all
    masked canvases, whatever the masks) and while the rows and their masks stay equal; where that is not
    known, the trunk runs on every row, as upstream's own forward does."""
    S, R, L = masks.shape
    W = R // K
    blocks = masks.view(S, W, K * L)
    rows = masks.view(S, W, K, L)
    same_masks = (rows == rows[:, :, :1]).flatten(2).all(2).tolist()  # [S][W]
    counts = blocks.sum(2).tolist()
    flat = blocks.nonzero()[:, 2].split([n for c in counts for n in c])  # per (step, window), in order
    untouched, same_rows = True, [True] * W  # the canvases as they start; their rows equal per window
    pieces, layout = [], []
    for s in range(S):
        equal = [untouched or (same_rows[w] and same_masks[s][w]) for w in range(W)]
        shared = K > 1 and all(equal)
        windows = []
        for w in range(W):
            f = flat[s * W + w]
            if shared and same_masks[s][w]:
                windows.append((f[: f.numel() // K], K))
            else:
                windows.append((f % L if shared else f, 1))
        in_canvas = torch.cat([f + w * K * L for w, f in enumerate(flat[s * W : s * W + W])])
        pieces += [i for i, _ in windows] + [in_canvas]
        layout.append((shared, [r for _, r in windows]))
        same_rows = [equal[w] and same_masks[s][w] and (shared or not counts[s][w]) for w in range(W)]
        untouched = untouched and not any(counts[s])
    device_pieces = to_device(torch.cat(pieces), device).split([p.numel() for p in pieces])
    out, k = [], 0
    for shared, repeats in layout:
        out.append(Gather(shared, list(zip(device_pieces[k : k + W], repeats)), device_pieces[k + W]))
        k += W + 1
    return out
