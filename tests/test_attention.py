"""The variable-length attention path (flash-attn's on a GPU) against padded SDPA, on the CPU: packing and
unpacking with a plain-torch kernel in flash-attn's place."""

import pytest
import torch
import torch.nn.functional as F

from whisfusion_cli import attention as A
from whisfusion_cli.decoding import DecodingOptions, decode_windows
from whisfusion_cli.model import ModelConfig, WhisperDiffusionDecoder, key_mask


@pytest.fixture
def varlen():
    A.use_backend("varlen", kernel=A.varlen_reference)
    yield
    A.use_backend(A.DEFAULT_BACKEND)


def test_pack_and_unpack_round_trip():
    x = torch.randn(3, 2, 7, 4)
    lengths = torch.tensor([7, 2, 5])
    packed, cu, longest = A.pack(x, lengths)
    assert packed.shape == (14, 2, 4) and cu.tolist() == [0, 7, 9, 14] and longest == 7
    assert torch.equal(packed[7:9], x[1, :, :2].transpose(0, 1))
    back = A.unpack(packed, cu, 7)
    real = (torch.arange(7) < lengths[:, None])[:, None, :, None]
    assert torch.equal(back, x * real)  # real rows as they were, zeros past each length


@pytest.mark.parametrize("same_lengths", [False, True])
def test_varlen_matches_padded_sdpa_on_real_positions(same_lengths):
    torch.manual_seed(0)
    B, H, T, S, hs = 4, 3, 9, 9 if same_lengths else 13, 8
    q, k, v = torch.randn(B, H, T, hs), torch.randn(B, H, S, hs), torch.randn(B, H, S, hs)
    lengths = torch.tensor([S, 3, 7, 1])
    padded = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(lengths, S))
    y = A.varlen_attention(q, k, v, lengths if same_lengths else None, lengths)
    rows = (torch.arange(T) < lengths[:, None]) if same_lengths else torch.ones(B, T, dtype=torch.bool)
    torch.testing.assert_close(y.transpose(1, 2)[rows], padded.transpose(1, 2)[rows], atol=1e-6, rtol=1e-5)
    if same_lengths:
        assert not y.transpose(1, 2)[~rows].any()  # padded queries cost nothing and hold zeros


def test_backend_is_sdpa_unless_chosen_and_falls_back_without_flash_attn():
    assert A.DEFAULT_BACKEND == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.use_backend("xformers")
    q = k = v = torch.randn(2, 1, 5, 4)
    mask = key_mask(torch.tensor([5, 2]), 5)
    A.use_backend("varlen")  # on the CPU (and without flash-attn) the path stays SDPA
    try:
        assert torch.equal(A.attend(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    finally:
        A.use_backend(A.DEFAULT_BACKEND)


def test_ragged_windows_decode_the_same_through_varlen(varlen):
    torch.manual_seed(0)
    dec = WhisperDiffusionDecoder(ModelConfig(family="whisper", n_layer=2, n_head=2, n_embd=32, intermediate_size=64,
                                              vocab_size=300, block_size=64, output_vocab_size=260)).eval()
    conds = [torch.randn(f, 32) for f in (200, 120, 150, 60)]
    options = DecodingOptions(candidates=3, steps=4, seq_len=None, max_seq_len=48, seed=5, strategy="confidence")
    durations = [9.0, 3.0, 6.0, 1.5]  # canvases and frames of four lengths in one batch
    calls = []
    kernel = A.varlen_reference
    A.use_backend("varlen", kernel=lambda *a: calls.append(a[3].numel()) or kernel(*a))
    through_varlen = decode_windows(dec, conds, options, [257, 258], 259, durations)
    A.use_backend("sdpa")
    padded = decode_windows(dec, conds, options, [257, 258], 259, durations)
    assert calls  # the kernel ran on packed batches
    for a, b in zip(through_varlen, padded):
        assert torch.equal(a.tokens, b.tokens) and a.text_tokens == b.text_tokens
        torch.testing.assert_close(a.confidences, b.confidences, atol=1e-5, rtol=0)
