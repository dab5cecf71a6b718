"""model.py's networks for inference in numpy: Whisper's AudioEncoder and the Whisper-family diffusion decoder
(WhisperDiffusionDecoder), in float32, one audio window at a time.

Why a second implementation: importing torch takes 1.2-2.4 s on a 2-core machine, more than faster-whisper's
whole run on one short file (issue 17), while the embedded default's networks (tiny.en's encoder, a 4-layer
decoder) are small enough for numpy's BLAS. Both read the same weights and compute the same functions as
model.py (tests/test_numpy_engine.py: encoder states and decoder logits within float rounding of torch's,
the same transcripts); numpy_decoding.py runs the decoding loop on them. Torch stays the engine of
training, of GPUs and of the SMDM family.

Arrays: a window's encoder states are [F, d]; a canvas is int64 [T]; attention works on [heads, T, head_size].
"""

from __future__ import annotations

import math

import numpy as np

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which every Whisper layer norm uses
SELF_QKV = "self_attn.qkv"  # the fused self-attention projection of every block (fuse)
# The transposed output projection ([d, n_logits], NumpyDecoder.head) under this name in `w` of a decoder
# made before (the engine cache keeps it, so no start copies the token table again).
OUTPUT_HEAD = "output_head"
CONV_KERNEL = 3  # both convolutions of Whisper's stem (padding 1; the second has stride 2)
# erf as a rational function in float32 (Eigen's and XLA's fast erf, max error ~1 ulp on [-4, 4]; erf is
# +-1 in float32 beyond): numpy has no erf, and scipy's costs an import as long as this module's run.
ERF_CLAMP = 4.0
GELU_CHUNK = 1 << 14  # elements per chunk of gelu (64 KB of float32)
SOFTMAX_CHUNK = 1 << 16  # elements per block of attention's in-place softmax (256 KB of float32)
ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
             -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # x^13 ... x^1 (odd)
ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)  # x^8 ... x^0 (even)


# ----------------------------------------------------------------------------------------------------------
# Layers


def as_float32(array: np.ndarray) -> np.ndarray:
    """A float32 copy of a float array (the array itself if it is float32 already). np.copyto widens float16
    ~10x faster than astype from a view of a memory-mapped file (measured: 0.05 s against 0.5 s for tiny.en's
    token table)."""
    if array.dtype == np.float32:
        return array
    out = np.empty(array.shape, dtype=np.float32)
    np.copyto(out, array)
    return out



def erf(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, -ERF_CLAMP, ERF_CLAMP).astype(np.float32, copy=False)
    x2 = x * x
    p = x2 * np.float32(ERF_ALPHA[0])  # Horner's rule, in place
    for a in ERF_ALPHA[1:-1]:
        p += np.float32(a)
        p *= x2
    p += np.float32(ERF_ALPHA[-1])
    q = x2 * np.float32(ERF_BETA[0])
    for b in ERF_BETA[1:-1]:
        q += np.float32(b)
        q *= x2
    q += np.float32(ERF_BETA[-1])
    p *= x
    p /= q
    return p


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU of torch.nn.functional.gelu, as every Whisper layer uses; in chunks that stay in
    the CPU's cache through erf's two dozen passes (1.6x faster on an encoder's MLP, measured)."""
    out = np.empty(x.shape, dtype=np.float32)
    flat, dst = x.reshape(-1), out.reshape(-1)
    for s in range(0, flat.size, GELU_CHUNK):
        part = flat[s : s + GELU_CHUNK]
        dst[s : s + GELU_CHUNK] = 0.5 * part * (1.0 + erf(part * np.float32(1.0 / math.sqrt(2.0))))
    return out


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(LAYER_NORM_EPS)) * weight + bias


def softmax(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Softmax over the last axis. in_place: into x itself where it is contiguous (attention's fresh scores),
    in blocks of rows that stay in the CPU's cache: the same numbers without two temporaries of x's size, which
    were most of a 30 s encoder's attention time (scripts/bench_attention.py: 1.45x on that encoder)."""
    if not in_place or not x.flags.c_contiguous:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    rows = x.reshape(-1, x.shape[-1])  # a view: rows in blocks that stay in the CPU's cache through the passes
    step = max(1, SOFTMAX_CHUNK // x.shape[-1])
    for s in range(0, len(rows), step):
        block = rows[s : s + step]
        block -= block.max(-1, keepdims=True)
        np.exp(block, out=block)
        block /= block.sum(-1, keepdims=True)
    return x


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    """x @ weight.T + bias of the Linear layer `name` (no bias where the layer has none), x [..., d_in]."""
    y = x.reshape(-1, x.shape[-1]) @ w[name + ".weight"].T
    bias = w.get(name + ".bias")
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], -1)


def heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """[..., T, d] -> [..., n_head, T, head_size]."""
    *lead, T, d = x.shape
    return np.swapaxes(x.reshape(*lead, T, n_head, d // n_head), -3, -2)


def merge_heads(y: np.ndarray) -> np.ndarray:
    """[..., H, T, hs] -> [..., T, H * hs]."""
    *lead, H, T, hs = y.shape
    return np.swapaxes(y, -3, -2).reshape(*lead, T, H * hs)


def attention_weights(q: np.ndarray, k: np.ndarray, scale: float, mask: np.ndarray | None = None) -> np.ndarray:
    """softmax(q k^T * scale) of q [..., H, T, hs] over k [..., H, F, hs]; mask: an additive [..., 1, 1, F]
    (0 for a key to attend to, -inf for padding)."""
    scores = q @ np.swapaxes(k, -1, -2)
    if scale != 1.0:  # (x * 1 is x: the encoder scales q beforehand)
        scores *= np.float32(scale)
    if mask is not None:
        scores += mask
    return softmax(scores, in_place=True)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Attention of q [..., H, T, hs] over k, v [..., H, F, hs] -> [..., T, H * hs]."""
    return merge_heads(attention_weights(q, k, scale, mask) @ v)


def key_mask(lengths: np.ndarray | None, size: int) -> np.ndarray | None:
    """The additive mask [B, 1, 1, size] letting row b attend to its first lengths[b] keys (model.key_mask);
    None where nothing is padded."""
    if lengths is None or bool((np.asarray(lengths) >= size).all()):
        return None
    valid = np.arange(size) < np.asarray(lengths)[:, None]
    return np.where(valid, np.float32(0.0), np.float32(-np.inf))[:, None, None, :]


def fuse(w: dict, prefix: str, names=("q_proj", "k_proj", "v_proj")) -> None:
    """The Linear layers `names` replaced by one, `prefix + "qkv"` (rows stacked; a missing bias is zeros):
    one matrix product instead of three, the same numbers."""
    weights = [w.pop(f"{prefix}{n}.weight") for n in names]
    biases = [w.pop(f"{prefix}{n}.bias", None) for n in names]
    w[prefix + "qkv.weight"] = np.concatenate(weights)
    w[prefix + "qkv.bias"] = np.concatenate([np.zeros(len(m), np.float32) if b is None else b
                                             for b, m in zip(biases, weights)])


def conv1d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """torch's Conv1d with kernel 3, padding 1 of x [C_in, M] -> [M // stride, C_out] (time first), as one
    matrix product over the stacked taps."""
    C_in, M = x.shape
    padded = np.pad(x, ((0, 0), (1, 1)))
    T = (M + 2 - CONV_KERNEL) // stride + 1
    taps = np.stack([padded[:, k : k + stride * (T - 1) + 1 : stride] for k in range(CONV_KERNEL)], axis=-1)
    columns = taps.transpose(1, 0, 2).reshape(T, C_in * CONV_KERNEL)  # [T, C_in * k], weight's own order
    return columns @ weight.reshape(weight.shape[0], -1).T + bias


# ----------------------------------------------------------------------------------------------------------
# Whisper's audio encoder


class NumpyAudioEncoder:
    """model.AudioEncoder: log-mel features [n_mels, M] (M even, <= 2 * n_ctx) -> states [M / 2, d].

    weights: float32 arrays by model.AudioEncoder's state-dict names ("conv1.weight", "layers.0.fc1.bias", ...)."""

    def __init__(self, weights: dict[str, np.ndarray], n_head: int):
        self.w, self.n_head = dict(weights), n_head
        self.n_layer = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("layers."))
        self.n_ctx, self.dim = weights["embed_positions.weight"].shape
        if f"layers.0.{SELF_QKV}.weight" not in weights:  # else `w` of an encoder made before (a cache of it)
            for i in range(self.n_layer):
                fuse(self.w, f"layers.{i}.self_attn.")

    def __call__(self, mel: np.ndarray) -> np.ndarray:
        w = self.w
        x = gelu(conv1d(mel, w["conv1.weight"], w["conv1.bias"], 1).T)
        x = gelu(conv1d(x, w["conv2.weight"], w["conv2.bias"], 2))
        if x.shape[0] > self.n_ctx:
            raise ValueError(f"{mel.shape[-1]} mel frames exceed the encoder's {2 * self.n_ctx}")
        x = x + w["embed_positions.weight"][: x.shape[0]]
        for i in range(self.n_layer):
            x = self._block(x, f"layers.{i}.")
        return layer_norm(x, w["layer_norm.weight"], w["layer_norm.bias"])

    def _block(self, x: np.ndarray, p: str) -> np.ndarray:
        w, H = self.w, self.n_head
        h = layer_norm(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"])
        d = x.shape[1]
        q, k, v = (heads(part, H) for part in np.split(linear(h, w, p + "self_attn.qkv"), 3, axis=-1))
        q = q * np.float32((d // H) ** -0.5)  # scaled before the product, as model.py
        x = x + linear(attend(q, k, v, 1.0), w, p + "self_attn.out_proj")
        h = layer_norm(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
        return x + linear(gelu(linear(h, w, p + "fc1")), w, p + "fc2")


# ----------------------------------------------------------------------------------------------------------
# The Whisper-family diffusion decoder (and, with a SelfAttentionCache, Whisper's own causal decoder)


def causal_mask(past: int, size: int) -> np.ndarray:
    """The additive mask [1, 1, size, past + size] of `size` new positions after `past` cached ones: each
    attends to every cached position, to itself and to the new ones before it."""
    keys = np.arange(past + size)
    allowed = keys[None, :] <= past + np.arange(size)[:, None]
    return np.where(allowed, np.float32(0.0), np.float32(-np.inf))[None, None]


class SelfAttentionCache:
    """The self-attention keys and values [1, H, T, hs] of every layer for the T positions a causal decoder
    has run so far, so a longer sequence runs only its new positions."""

    def __init__(self, n_layer: int):
        self.keys: list[np.ndarray | None] = [None] * n_layer
        self.values: list[np.ndarray | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def extend(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer`'s keys and values with the new positions' k, v appended (and kept)."""
        if self.keys[layer] is not None:
            k = np.concatenate([self.keys[layer], k], axis=-2)
            v = np.concatenate([self.values[layer], v], axis=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (tokens the verifier did not accept)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[..., :length, :], v[..., :length, :]


class NumpyUnsupported(ValueError):
    """A model the numpy engine cannot run (the torch engine can)."""


class NumpyDecoder:
    """model.WhisperDiffusionDecoder for one window: Whisper decoder blocks without the causal mask, a
    learned mask embedding, the output tied to the first n_logits rows of the token table.

    weights: arrays by the decoder's state-dict names, float32 but for `embed_tokens.weight`, which may stay
    a float16 view of the Whisper file it comes from (rows are widened as they are read: exact). config: the
    model directory's "decoder" section."""

    def __init__(self, weights: dict[str, np.ndarray], config: dict, head: np.ndarray | None = None):
        """head: the float32 output projection, transposed ([d, n_logits], `head`), where another decoder over
        the same token table made it already (the verifier and the draft decoder share tiny.en's: 77 MB once,
        not twice)."""
        self.check_config(config)
        self.n_layer, self.n_head = int(config["n_layer"]), int(config["n_head"])
        fused = f"layers.0.{SELF_QKV}.weight" in weights  # `w` of a decoder made before (a cache of it)
        weights = dict(weights)
        cached_head = weights.pop(OUTPUT_HEAD, None)  # never a weight to check: the cache's copy of the table
        head = cached_head if head is None else head
        expected = self.names(self.n_layer, fused)
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise ValueError(f"weights do not fit the decoder its config describes (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
        self.w = weights  # the arrays it runs on, self-attention projections fused
        if not fused:
            for i in range(self.n_layer):
                fuse(self.w, f"layers.{i}.self_attn.")
        self.block_size = int(config.get("block_size", weights["embed_positions.weight"].shape[0]))
        self.mask_token_id = int(config["vocab_size"])  # one past the tokenizer's vocabulary
        self.n_logits = int(config.get("output_vocab_size") or config["vocab_size"])
        self.table = self.w["embed_tokens.weight"]
        self._head: np.ndarray | None = head  # the float32 output projection [d, n_logits], made on first use

    @staticmethod
    def check_config(config) -> None:
        """NumpyUnsupported for a decoder config (a model directory's "decoder" section) this class cannot run."""
        if not isinstance(config, dict) or config.get("family") != "whisper":
            family = config.get("family", "smdm") if isinstance(config, dict) else config
            raise NumpyUnsupported(f"the numpy engine runs Whisper-family decoders only, not {family!r}")
        if config.get("condition_dim") not in (None, config["n_embd"]):
            raise NumpyUnsupported("the numpy engine does not run a decoder with a condition projection")

    @staticmethod
    def names(n_layer: int, fused: bool = False) -> set[str]:
        """The weights' names (model.WhisperDiffusionDecoder's state dict without a condition projection);
        fused: as `w` holds them (the self-attention's q/k/v projections as one)."""
        block = [f"{norm}.{p}" for norm in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
                 for p in ("weight", "bias")]
        block += [f"{attn}.{proj}.{p}" for attn in ("self_attn", "encoder_attn")
                  for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for p in ("weight", "bias")
                  if (proj, p) != ("k_proj", "bias")]
        block += [f"{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")]
        if fused:
            block = [n for n in block if not n.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
            block += [f"{SELF_QKV}.weight", f"{SELF_QKV}.bias"]
        top = {"embed_tokens.weight", "embed_positions.weight", "mask_embedding", "layer_norm.weight", "layer_norm.bias"}
        return top | {f"layers.{i}.{name}" for i in range(n_layer) for name in block}

    def cross_kv(self, states: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Keys and values [B, H, F, hs] of every layer's cross-attention for encoder states [B, F, d] (windows
        zero-padded to the longest): once per batch of windows, for every step."""
        w, H = self.w, self.n_head
        return [(heads(linear(states, w, f"layers.{i}.encoder_attn.k_proj"), H),
                 heads(linear(states, w, f"layers.{i}.encoder_attn.v_proj"), H)) for i in range(self.n_layer)]

    def hidden_states(self, idx: np.ndarray, kv, lengths=None, frames=None, capture: dict | None = None,
                      cache: "SelfAttentionCache | None" = None) -> np.ndarray:
        """Canvases idx int64 [B, T] -> final hidden states [B, T, d] (model.DecoderBase.hidden_states).
        lengths [B]: each row's canvas positions (the rest is padding no position attends to); frames [B]: the
        encoder states of each row's window in kv. capture {layer: head list}: the cross-attention weights
        [B, len(heads), T, F] of those heads, stored back into it (word timestamps). cache: causal decoding
        (Whisper's own decoder, verify.py): idx continues the positions whose self-attention keys and values
        the cache holds, each position attends to those and to itself and the ones before it, and the new keys
        and values are added to the cache."""
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if past + T > self.block_size:
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.block_size}")
        w = self.w
        is_mask = idx == self.mask_token_id
        tokens = self.table[np.minimum(idx, self.table.shape[0] - 1)].astype(np.float32)
        x = np.where(is_mask[..., None], w["mask_embedding"], tokens) + w["embed_positions.weight"][past : past + T]
        self_mask = key_mask(lengths, T) if cache is None else causal_mask(past, T)
        masks = (self_mask, key_mask(frames, kv[0][0].shape[2]))
        for i in range(self.n_layer):
            x = self._block(x, i, kv[i], masks, capture, cache)
        return layer_norm(x, w["layer_norm.weight"], w["layer_norm.bias"])

    def _block(self, x: np.ndarray, i: int, kv, masks, capture: dict | None,
               cache: "SelfAttentionCache | None" = None) -> np.ndarray:
        w, H, p = self.w, self.n_head, f"layers.{i}."
        scale = (x.shape[-1] // H) ** -0.5
        h = layer_norm(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"])
        q, k, v = (heads(part, H) for part in np.split(linear(h, w, p + "self_attn.qkv"), 3, axis=-1))
        if cache is not None:
            k, v = cache.extend(i, k, v)
        x = x + linear(attend(q, k, v, scale, masks[0]), w, p + "self_attn.out_proj")
        h = layer_norm(x, w[p + "encoder_attn_layer_norm.weight"], w[p + "encoder_attn_layer_norm.bias"])
        q = heads(linear(h, w, p + "encoder_attn.q_proj"), H)
        if capture is not None and i in capture:
            chosen = capture[i]
            capture[i] = attention_weights(q[:, chosen], kv[0][:, chosen], scale, masks[1])
        x = x + linear(attend(q, *kv, scale, masks[1]), w, p + "encoder_attn.out_proj")
        h = layer_norm(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
        return x + linear(gelu(linear(h, w, p + "fc1")), w, p + "fc2")

    def alignment_weights(self, idx: np.ndarray, chosen: list[tuple[int, int]], kv, lengths=None,
                          frames=None) -> np.ndarray:
        """Cross-attention weights [B, len(chosen), T, F] of the (layer, head) pairs `chosen` over canvases
        idx [B, T] (as hidden_states reads lengths and frames)."""
        capture: dict = {}
        for layer, head in chosen:
            capture.setdefault(layer, []).append(head)
        self.hidden_states(idx, kv, lengths, frames, capture)
        order = {layer: iter(range(capture[layer].shape[1])) for layer in capture}
        return np.stack([capture[layer][:, next(order[layer])] for layer, _ in chosen], axis=1)

    @property
    def head(self) -> np.ndarray:
        """The output projection, transposed: [d, n_logits] float32 (77 MB for tiny.en's table: made once, when
        needed). Stored this way round because a few rows times it is the common product (the verifier's
        rounds, a step's masked positions), which BLAS runs 1.5-2.7x faster (4 to 64 rows) than against
        [n_logits, d].T (scripts/bench_projection.py)."""
        if self._head is None:
            self._head = np.ascontiguousarray(as_float32(self.table[: self.n_logits]).T)
        return self._head

    def project(self, hidden: np.ndarray) -> np.ndarray:
        """Hidden states [n, d] -> logits [n, n_logits]."""
        return hidden @ self.head

    def output_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of the output projection [len(ids), d]: `hidden @ rows.T` are those tokens' logits."""
        return np.ascontiguousarray(self.head[:, ids].T)


__all__ = ["as_float32", "causal_mask", "NumpyAudioEncoder", "NumpyDecoder", "SelfAttentionCache", "NumpyUnsupported", "gelu", "erf", "layer_norm", "softmax", "log_softmax"]
