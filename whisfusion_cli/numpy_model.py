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
CONV_KERNEL = 3  # both convolutions of Whisper's stem (padding 1; the second has stride 2)
# erf as a rational function in float32 (Eigen's and XLA's fast erf, max error ~1 ulp on [-4, 4]; erf is
# +-1 in float32 beyond): numpy has no erf, and scipy's costs an import as long as this module's run.
ERF_CLAMP = 4.0
ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
             -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # x^13 ... x^1 (odd)
ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)  # x^8 ... x^0 (even)


# ----------------------------------------------------------------------------------------------------------
# Layers


def erf(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, -ERF_CLAMP, ERF_CLAMP).astype(np.float32, copy=False)
    x2 = x * x
    p = np.full_like(x, ERF_ALPHA[0])
    for a in ERF_ALPHA[1:]:
        p *= x2
        p += a
    q = np.full_like(x, ERF_BETA[0])
    for b in ERF_BETA[1:]:
        q *= x2
        q += b
    return x * p / q


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU of torch.nn.functional.gelu, as every Whisper layer uses."""
    return 0.5 * x * (1.0 + erf(x * np.float32(1.0 / math.sqrt(2.0))))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(LAYER_NORM_EPS)) * weight + bias


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    """x @ weight.T + bias of the Linear layer `name` (no bias where the layer has none)."""
    y = x @ w[name + ".weight"].T
    bias = w.get(name + ".bias")
    return y if bias is None else y + bias


def heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """[T, d] -> [n_head, T, head_size]."""
    T, d = x.shape
    return x.reshape(T, n_head, d // n_head).transpose(1, 0, 2)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Unmasked attention of q [H, T, hs] over k, v [H, F, hs] -> [T, H * hs]."""
    y = softmax((q @ k.transpose(0, 2, 1)) * np.float32(scale)) @ v
    return y.transpose(1, 0, 2).reshape(q.shape[1], -1)


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
        self.w, self.n_head = weights, n_head
        self.n_layer = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("layers."))
        self.n_ctx, self.dim = weights["embed_positions.weight"].shape

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
        hs = x.shape[1] // H
        q = heads(linear(h, w, p + "self_attn.q_proj") * np.float32(hs**-0.5), H)  # scaled first, as model.py
        k, v = heads(linear(h, w, p + "self_attn.k_proj"), H), heads(linear(h, w, p + "self_attn.v_proj"), H)
        x = x + linear(attend(q, k, v, 1.0), w, p + "self_attn.out_proj")
        h = layer_norm(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
        return x + linear(gelu(linear(h, w, p + "fc1")), w, p + "fc2")


# ----------------------------------------------------------------------------------------------------------
# The Whisper-family diffusion decoder


class NumpyDecoder:
    """model.WhisperDiffusionDecoder for one window: Whisper decoder blocks without the causal mask, a
    learned mask embedding, the output tied to the first n_logits rows of the token table.

    weights: arrays by the decoder's state-dict names, float32 but for `embed_tokens.weight`, which may stay
    a float16 view of the Whisper file it comes from (rows are widened as they are read: exact). config: the
    model directory's "decoder" section."""

    def __init__(self, weights: dict[str, np.ndarray], config: dict):
        if config.get("family") != "whisper":
            raise ValueError(f"the numpy engine runs Whisper-family decoders only, not {config.get('family')!r}")
        if config.get("condition_dim") not in (None, config["n_embd"]):
            raise ValueError("the numpy engine does not run a decoder with a condition projection")
        self.w, self.n_layer, self.n_head = weights, int(config["n_layer"]), int(config["n_head"])
        self.block_size = int(config.get("block_size", weights["embed_positions.weight"].shape[0]))
        self.mask_token_id = int(config["vocab_size"])  # one past the tokenizer's vocabulary
        self.n_logits = int(config.get("output_vocab_size") or config["vocab_size"])
        self.table = weights["embed_tokens.weight"]
        self._head: np.ndarray | None = None  # the float32 output projection, made on first use

    def cross_kv(self, states: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Keys and values [H, F, hs] of every layer's cross-attention for encoder states [F, d]: once per window."""
        w, H = self.w, self.n_head
        return [(heads(linear(states, w, f"layers.{i}.encoder_attn.k_proj"), H),
                 heads(linear(states, w, f"layers.{i}.encoder_attn.v_proj"), H)) for i in range(self.n_layer)]

    def hidden_states(self, idx: np.ndarray, kv, capture: dict | None = None) -> np.ndarray:
        """Canvas idx int64 [T] -> final hidden states [T, d]. capture {layer: head list}: the cross-attention
        weights [len(heads), T, F] of those heads, stored back into it (word timestamps)."""
        T = len(idx)
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        w = self.w
        is_mask = idx == self.mask_token_id
        tokens = self.table[np.minimum(idx, self.table.shape[0] - 1)].astype(np.float32)
        x = np.where(is_mask[:, None], w["mask_embedding"], tokens) + w["embed_positions.weight"][:T]
        for i in range(self.n_layer):
            x = self._block(x, i, kv[i], capture)
        return layer_norm(x, w["layer_norm.weight"], w["layer_norm.bias"])

    def _block(self, x: np.ndarray, i: int, kv, capture: dict | None) -> np.ndarray:
        w, H, p = self.w, self.n_head, f"layers.{i}."
        hs = x.shape[1] // H
        h = layer_norm(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"])
        q, k, v = (heads(linear(h, w, p + "self_attn." + n), H) for n in ("q_proj", "k_proj", "v_proj"))
        x = x + linear(attend(q, k, v, hs**-0.5), w, p + "self_attn.out_proj")
        h = layer_norm(x, w[p + "encoder_attn_layer_norm.weight"], w[p + "encoder_attn_layer_norm.bias"])
        q = heads(linear(h, w, p + "encoder_attn.q_proj"), H)
        if capture is not None and i in capture:
            chosen = capture[i]
            capture[i] = softmax(q[chosen] @ kv[0][chosen].transpose(0, 2, 1) * np.float32(hs**-0.5))
        x = x + linear(attend(q, *kv, hs**-0.5), w, p + "encoder_attn.out_proj")
        h = layer_norm(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
        return x + linear(gelu(linear(h, w, p + "fc1")), w, p + "fc2")

    def alignment_weights(self, idx: np.ndarray, chosen: list[tuple[int, int]], kv) -> np.ndarray:
        """Cross-attention weights [len(chosen), T, F] of the (layer, head) pairs `chosen` over canvas idx."""
        capture: dict = {}
        for layer, head in chosen:
            capture.setdefault(layer, []).append(head)
        self.hidden_states(idx, kv, capture)
        order = {layer: iter(range(len(capture[layer]))) for layer in capture}
        return np.stack([capture[layer][next(order[layer])] for layer, _ in chosen])

    @property
    def head(self) -> np.ndarray:
        """The output projection [n_logits, d], float32 (77 MB for tiny.en's table: made once, when needed)."""
        if self._head is None:
            self._head = np.ascontiguousarray(self.table[: self.n_logits], dtype=np.float32)
        return self._head

    def project(self, hidden: np.ndarray) -> np.ndarray:
        """Hidden states [n, d] -> logits [n, n_logits]."""
        return hidden @ self.head.T

    def output_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of the output projection [len(ids), d]: `hidden @ rows.T` are those tokens' logits."""
        return self.head[ids]


__all__ = ["NumpyAudioEncoder", "NumpyDecoder", "gelu", "erf", "layer_norm", "softmax", "log_softmax"]
