"""Host syncs of the decoding loop (issue 19): on a GPU every read of a device value by the host (a Python
number from a tensor, a shape that depends on values, a comparison answered on the host) waits for the
queue of kernels. Counted on the CPU by wrapping the calls that would sync: the remask loop reads nothing per
step (its masks come from the host), the confidence loop one value list per step and per refine pass,
whatever the number of windows (the sizes of what a step projects are values)."""

from __future__ import annotations

import pytest
import torch

from tiny_model import make_decoder

from whisfusion_cli.decoding import DecodingOptions, decode_windows

# (frames, seconds) per window: canvases and encoder states of different lengths in one batch.
WINDOWS = [(60, 6.0), (40, 8.0), (50, 5.0)]
BASE = {"seq_len": None, "max_seq_len": 48, "seed": 3}
METHODS = ("item", "tolist", "nonzero", "__int__", "__float__", "__bool__", "__index__", "equal", "unique")
FUNCTIONS = ("nonzero", "equal", "unique", "masked_select")


def _is_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts)


class SyncCounter:
    """Counts the calls that read a device value on the host, by name (boolean-mask indexing as "mask")."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        for name in METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        for name in FUNCTIONS:
            monkeypatch.setattr(torch, name, self._counted(name, getattr(torch, name)))
        get, put = torch.Tensor.__getitem__, torch.Tensor.__setitem__
        monkeypatch.setattr(torch.Tensor, "__getitem__", lambda t, i: (self._mask(i), get(t, i))[1])
        monkeypatch.setattr(torch.Tensor, "__setitem__", lambda t, i, v: (self._mask(i), put(t, i, v))[1])

    def _counted(self, name, real):
        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*args, **kwargs)

        return call

    def _mask(self, index) -> None:
        if _is_mask(index):
            self.calls["mask"] = self.calls.get("mask", 0) + 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture(scope="module")
def decoder():
    return make_decoder(seed=3).eval()


def _conditions(decoder, n):
    g = torch.Generator().manual_seed(4)
    return [torch.randn(f, decoder.config.n_embd, generator=g) for f, _ in WINDOWS[:n]]


def _syncs(monkeypatch, decoder, windows: int, **options) -> int:
    """Host syncs of one decode_windows call (results included: they are read once per window)."""
    conditions = _conditions(decoder, windows)
    opts = DecodingOptions(**{**BASE, **options})
    seconds = [s for _, s in WINDOWS[:windows]]
    with monkeypatch.context() as patch:
        counter = SyncCounter(patch)
        decode_windows(decoder, conditions, opts, [1], 2, seconds)
    return counter.total


def test_counter_sees_the_syncs(monkeypatch):
    with monkeypatch.context() as patch:
        counter = SyncCounter(patch)
        t = torch.arange(6)
        int(t.sum()), t.tolist(), t.nonzero(), bool(t.any()), t[t > 2], torch.equal(t, t)
    assert counter.calls == {"__int__": 1, "tolist": 1, "nonzero": 1, "__bool__": 1, "mask": 1, "equal": 1}


@pytest.mark.parametrize("candidates", [1, 3])
def test_remask_loop_reads_nothing_per_step(monkeypatch, decoder, candidates):
    counts = [_syncs(monkeypatch, decoder, 3, strategy="remask", candidates=candidates, steps=steps)
              for steps in (4, 8)]
    assert counts[0] == counts[1], counts


CONFIDENCE_CASES = {
    "default_model": {"candidates": 1, "repeat_penalty": 0.5, "shortlist": 8, "pad_context": 3},
    "sampled": {"candidates": 3, "temperature": 0.8, "repeat_penalty": 0.3, "shortlist": 6, "pad_context": 2},
}


@pytest.mark.parametrize("case", sorted(CONFIDENCE_CASES))
def test_confidence_loop_reads_once_per_step(monkeypatch, decoder, case):
    """One read per step (the sizes of what the step projects are values), none per window and step."""
    options = {"strategy": "confidence", **CONFIDENCE_CASES[case]}
    per_step = {}
    for windows in (1, 3):
        counts = [_syncs(monkeypatch, decoder, windows, steps=steps, **options) for steps in (4, 8)]
        per_step[windows] = counts[1] - counts[0]
    assert 0 < per_step[3] <= 4 and per_step[1] == per_step[3], per_step


def test_refine_reads_once_per_pass(monkeypatch, decoder):
    options = {"strategy": "confidence", "steps": 4, **CONFIDENCE_CASES["sampled"]}
    counts = [_syncs(monkeypatch, decoder, 3, refine=passes, **options) for passes in (0, 3)]
    assert counts[1] - counts[0] == 3, counts
