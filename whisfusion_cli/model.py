"""The masked-diffusion text decoders, top to bottom.

Two families share one interface (`forward(idx, condition) -> logits`, a mask token id, and a hook to
precompute the cross-attention keys/values of an audio window once):

* `DiffusionDecoder` — upstream Whisfusion: the SMDM LLaMA-style bidirectional decoder with a
  cross-attention adapter in every block (SPEC section 2). State-dict keys and numerics are upstream's.
* `WhisperDiffusionDecoder` — Whisper's own decoder blocks with the causal mask removed and a learned mask
  embedding; initialised from a pre-trained Whisper decoder. This is the family of the small embedded
  default model, because a Whisper-initialised decoder trains on a CPU in minutes (docs/MODEL_CARD.md).
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend
# The architecture dataclass and its presets are read without torch (config.py); re-exported here.
from .config import FIXED_UPSTREAM_FIELDS, IGNORED_UPSTREAM_FIELDS, PRESETS, AudioEncoderDims, ModelConfig  # noqa: F401

ROPE_BASE = 10000
class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device (a model built there to receive a
    checkpoint's tensors): torch's meta normal_ imports torch._dynamo, about a second of start-up."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


# ----------------------------------------------------------------------------------------------------------
# SMDM family (upstream Whisfusion)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 and cast back, as upstream's fused kernel does.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


def build_rope_cache(seq_len: int, n_elem: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, n_elem/2]: computed in fp32, then rounded to the parameters' dtype (upstream)."""
    theta = 1.0 / (ROPE_BASE ** (torch.arange(0, n_elem, 2, device=device) / n_elem))
    idx_theta = torch.outer(torch.arange(seq_len, device=device).float(), theta)
    cos, sin = torch.cos(idx_theta), torch.sin(idx_theta)
    if dtype in (torch.float16, torch.bfloat16):
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding on the first 2*cos.size(-1) dims of x [B, T, H, hs], in fp32."""
    rot = 2 * cos.size(-1)
    x32 = x.float()
    x1, x2, rest = x32[..., : rot // 2], x32[..., rot // 2 : rot], x32[..., rot:]
    c, s = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], dim=-1)
    return out.to(x.dtype)


class SelfAttention(nn.Module):
    """Bidirectional self-attention; the fused projection is laid out per query group: [q.., k, v] x groups."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_head, self.n_groups, self.head_size = c.n_head, c.n_query_groups, c.head_size
        self.attn = nn.Linear(c.n_embd, (c.n_head + 2 * c.n_query_groups) * c.head_size, bias=False)
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        B, T, C = x.shape
        q_per_kv = self.n_head // self.n_groups
        qkv = self.attn(x).view(B, T, self.n_groups, q_per_kv + 2, self.head_size)
        q, k, v = qkv.split((q_per_kv, 1, 1), dim=-2)
        q = q.reshape(B, T, self.n_head, self.head_size)
        k = k.expand(B, T, self.n_groups, q_per_kv, self.head_size).reshape(B, T, self.n_head, self.head_size)
        v = v.expand(B, T, self.n_groups, q_per_kv, self.head_size).reshape(B, T, self.n_head, self.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, same_lengths=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def key_mask(lengths: torch.Tensor | None, size: int, padded: bool | None = None) -> torch.Tensor | None:
    """Attention mask [B, 1, 1, size] letting row b attend to its first lengths[b] keys only (padding of a
    batch of windows of different lengths), or None when nothing is padded. padded: whether some length is
    below size, where the caller knows it (None: compared here, a host sync on a GPU)."""
    if lengths is None or padded is False or (padded is None and bool((lengths >= size).all())):
        return None
    return (torch.arange(size, device=lengths.device) < lengths[:, None])[:, None, None, :]


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """q [B, T, H, hs] against k/v [B_kv, H, F, hs], where B is a multiple of B_kv; mask: [B_kv, 1, 1, F]
    for encoder states padded to a common length.

    When several rows of q share one audio window (K candidates), their queries are folded into one long
    query sequence against that window's keys/values: cross-attention has no position coupling between
    queries, so this is exact and never copies the keys/values K times.
    """
    B, T, H, hs = q.shape
    B_kv = k.size(0)
    group = B // B_kv
    q = q.reshape(B_kv, group * T, H, hs).transpose(1, 2)
    y = attend(q, k, v, mask)  # [B_kv, H, group*T, hs]
    return y.transpose(1, 2).reshape(B, T, H * hs)


class CrossAttention(nn.Module):
    """The Whisfusion adapter: queries from the text, keys/values from the encoder states, no rotary, no mask."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_head, self.head_size, self.n_embd = c.n_head, c.head_size, c.n_embd
        self.q_proj = nn.Linear(c.n_embd, c.n_embd, bias=False)
        self.kv_proj = nn.Linear(c.n_embd, 2 * c.n_embd, bias=False)
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=False)

    def keys_values(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, Fr, _ = condition.shape
        k, v = self.kv_proj(condition).split(self.n_embd, dim=-1)
        k = k.view(B, Fr, self.n_head, self.head_size).transpose(1, 2)
        v = v.view(B, Fr, self.n_head, self.head_size).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask=None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size)
        return self.proj(cross_attention(q, *kv, mask=mask))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LLaMAMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = SwiGLU(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swiglu(x)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = SelfAttention(config)
        self.norm_cross = RMSNorm(config.n_embd, config.norm_eps)
        self.cross_attn = CrossAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = LLaMAMLP(config)

    def forward(self, x, cos, sin, kv=None, self_mask=None, cross_mask=None):
        x = x + self.attn(self.norm_1(x), cos, sin, self_mask)
        if kv is not None:  # no condition: the whole cross-attention sub-block is skipped (upstream)
            x = x + self.cross_attn(self.norm_cross(x), kv, cross_mask)
        return x + self.mlp(self.norm_2(x))


class DecoderBase(nn.Module):
    """What both families share: condition handling and the decoding interface."""

    config: ModelConfig

    def _condition_in(self, condition: torch.Tensor) -> torch.Tensor:
        condition = condition.to(self.dtype)
        return self.condition_proj(condition) if self.condition_proj is not None else condition

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def precompute_cross_kv(self, condition: torch.Tensor) -> list:
        """Keys/values of every layer's cross-attention for encoder states [B, F, d]: compute once per window,
        reuse for every candidate and step."""
        condition = self._condition_in(condition)
        return [self._cross_module(i).keys_values(condition) for i in range(self.config.n_layer)]

    def hidden_states(self, idx, *, cross_kv=None, lengths=None, frames=None, padded=(None, None)) -> torch.Tensor:
        """idx int64 [B, T] -> final hidden states [B, T, n_embd] (the forward pass before the projection), so
        a decoding loop can project only the rows it needs, window by window.

        A batch of windows of different lengths: lengths [B] (canvas positions of each row; the rest is
        padding no position attends to) and frames [B_kv] (encoder states of each window in cross_kv; the
        rest is padding). The hidden states of padded positions are meaningless. padded: (some canvas
        shorter than T, some window with fewer frames), where the caller knows (key_mask)."""
        self_mask = key_mask(lengths, idx.size(1), padded[0])
        cross_mask = key_mask(frames, cross_kv[0][0].size(2), padded[1]) if cross_kv is not None else None
        return self._trunk(idx, cross_kv, self_mask, cross_mask)

    @torch.no_grad()
    def alignment_weights(self, idx, heads, *, cross_kv, lengths=None, frames=None) -> torch.Tensor:
        """Cross-attention weights of the (layer, head) pairs `heads` for canvases idx [B, T], one per window
        of cross_kv: [B, len(heads), T, F], each row a softmax over the window's frames (word timestamps).

        The trunk runs as in hidden_states; a hook on each chosen layer's cross-attention recomputes the
        chosen heads' scores from its input (the attention itself stays one fused kernel)."""
        captured: dict[int, torch.Tensor] = {}
        cross_mask = key_mask(frames, cross_kv[0][0].size(2))

        def capture(layer: int):
            def hook(module, args):
                x, (k, _) = args[0], args[1]
                B, T, _ = x.shape
                q = module.q_proj(x).view(B, T, module.n_head, module.head_size).transpose(1, 2)
                chosen = [h for l, h in heads if l == layer]
                scores = q[:, chosen].float() @ k[:, chosen].float().transpose(-1, -2) * module.head_size ** -0.5
                if cross_mask is not None:
                    scores = scores.masked_fill(~cross_mask, float("-inf"))
                captured[layer] = scores.softmax(-1)
            return hook

        hooks = [self._cross_module(layer).register_forward_pre_hook(capture(layer))
                 for layer in sorted({l for l, _ in heads})]
        try:
            self.hidden_states(idx, cross_kv=cross_kv, lengths=lengths, frames=frames)
        finally:
            for h in hooks:
                h.remove()
        order = {layer: iter(range(captured[layer].size(1))) for layer in captured}
        return torch.stack([captured[l][:, next(order[l])] for l, _ in heads], dim=1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., n_embd] -> logits [..., n_logits]."""
        return self._head(x)

    def output_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the output projection, [len(ids), n_embd] in the decoder's dtype: `x @ rows.T` are the
        logits of those tokens only (a decoding shortlist; an int8 head's rows are read as float)."""
        return self._output_weight()[ids]

    def coarse_project(self, x: torch.Tensor) -> torch.Tensor:
        """Approximate logits of x [n, n_embd] through an int8 copy of the output projection (CPU, dynamic
        quantisation, built on first use and kept out of the state dict): good enough to pick a shortlist of
        likely tokens, 3-4x cheaper than the float product on a CPU, where it is memory-bound."""
        key = self._head_key()
        head = self.__dict__.get("_coarse_head")
        if head is None or head[0] != key:  # built on first use, rebuilt if the weights changed
            weight = self._output_weight().detach().float()
            linear = nn.Linear(weight.size(1), weight.size(0), bias=False)
            # A view of the weight, not a copy: quantisation reads it once to make the int8 weight.
            linear.weight = nn.Parameter(weight, requires_grad=False)
            head = (key, quantize_linears(nn.Sequential(linear)))
            self.__dict__["_coarse_head"] = head  # a plain attribute: not a submodule, not in the state dict
        return head[1](x.float())

    def _head_key(self) -> tuple:
        """Identifies the output projection's current weights: its tensor and that tensor's in-place version."""
        w = self._head_tensor()
        return (id(self), w.data_ptr(), w._version) if isinstance(w, torch.Tensor) else (id(self), "int8")

    def forward(self, idx, condition=None, *, cross_kv=None, positions=None, frames=None):
        """idx int64 [B, T] -> logits [B, T, n_logits].

        condition: encoder states [B or B/K, F, condition_dim]; or cross_kv from `precompute_cross_kv`.
        positions: optional bool [B, T]; only those positions go through the output projection and the result
        is [N, n_logits] in row-major order (the projection dominates the cost of small decoders).
        frames: optional [B or B/K] valid encoder states of each condition row when a batch is zero-padded to
        its longest item: the padding is masked out of cross-attention exactly as `hidden_states(frames=)`
        does at inference (a zero state still gets attention weight, and a v_proj bias turns it into signal).
        """
        kv = cross_kv
        if kv is None and condition is not None:
            cond = self._condition_in(condition)
            kv = [self._cross_module(i).keys_values(cond) for i in range(self.config.n_layer)]
        cross_mask = key_mask(frames, kv[0][0].size(2)) if (kv is not None and frames is not None) else None
        x = self._trunk(idx, kv, None, cross_mask)
        if positions is not None:
            x = x[positions]
        return self._head(x)


class DiffusionDecoder(DecoderBase):
    """Upstream Whisfusion decoder (lit_gpt `TransEncoder` with cross-attention). Keys match upstream."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.family == "smdm"
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(
            dict(
                wte=Embedding(config.padded_vocab_size + 1, config.n_embd),  # + the mask token row
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        cd = config.condition_dim
        self.condition_proj = nn.Linear(cd, config.n_embd, bias=False) if cd and cd != config.n_embd else None
        self._rope = None  # (dtype, device, cos, sin), rebuilt when either changes

    def _cross_module(self, i: int) -> CrossAttention:
        return self.transformer.h[i].cross_attn

    def rope_cache(self):
        dtype, device = self.dtype, self.device
        if self._rope is None or self._rope[0] != dtype or self._rope[1] != device:
            cos, sin = build_rope_cache(self.config.block_size, self.config.rope_n_elem, dtype, device)
            self._rope = (dtype, device, cos, sin)
        return self._rope[2], self._rope[3]

    def _trunk(self, idx, kv, self_mask=None, cross_mask=None):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        cos, sin = self.rope_cache()
        cos, sin = cos[:T], sin[:T]
        x = self.transformer.wte(idx)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, kv[i] if kv is not None else None, self_mask, cross_mask)
        return self.transformer.ln_f(x)

    def _head(self, x):
        return self.lm_head(x)

    def _output_weight(self):
        w = self.lm_head.weight
        return w().dequantize() if callable(w) else w  # a dynamically quantised Linear stores int8

    def _head_tensor(self):
        return self.lm_head.weight


# ----------------------------------------------------------------------------------------------------------
# Whisper family (bidirectional Whisper decoder; names follow transformers' WhisperDecoder)


class WhisperAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head, self.head_size = n_head, d // n_head
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def keys_values(self, condition: torch.Tensor):
        B, Fr, _ = condition.shape
        k = self.k_proj(condition).view(B, Fr, self.n_head, self.head_size).transpose(1, 2)
        v = self.v_proj(condition).view(B, Fr, self.n_head, self.head_size).transpose(1, 2)
        return k, v

    def forward(self, x, kv=None, mask=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size)
        if kv is None:  # self-attention, bidirectional: no causal mask
            k, v = self.keys_values(x)
            y = attend(q.transpose(1, 2), k, v, mask, same_lengths=True)
            y = y.transpose(1, 2).reshape(B, T, C)
        else:
            y = cross_attention(q, *kv, mask=mask)
        return self.out_proj(y)


class WhisperBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.n_embd
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = WhisperAttention(d, config.n_head)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = WhisperAttention(d, config.n_head)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, d)

    def forward(self, x, kv=None, self_mask=None, cross_mask=None):
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask=self_mask)
        if kv is not None:
            x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), kv, cross_mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperDiffusionDecoder(DecoderBase):
    """Whisper decoder blocks without the causal mask, a learned mask embedding, output tied to the token
    embedding and restricted to the first `output_vocab_size` rows (text tokens + end-of-text)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.family == "whisper"
        self.config = config
        d = config.n_embd
        self.embed_tokens = Embedding(config.vocab_size, d)
        self.embed_positions = Embedding(config.block_size, d)
        self.mask_embedding = nn.Parameter(torch.zeros(d))
        self.layers = nn.ModuleList(WhisperBlock(config) for _ in range(config.n_layer))
        self.layer_norm = nn.LayerNorm(d)
        cd = config.condition_dim
        self.condition_proj = nn.Linear(cd, d, bias=False) if cd and cd != d else None

    def _cross_module(self, i: int) -> WhisperAttention:
        return self.layers[i].encoder_attn

    def _trunk(self, idx, kv, self_mask=None, cross_mask=None):
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        is_mask = (idx == self.config.mask_token_id).unsqueeze(-1)
        tok = self.embed_tokens(idx.clamp(max=self.config.vocab_size - 1))
        x = torch.where(is_mask, self.mask_embedding.to(tok.dtype), tok)
        x = x + self.embed_positions.weight[:T]
        for i, layer in enumerate(self.layers):
            x = layer(x, kv[i] if kv is not None else None, self_mask, cross_mask)
        return self.layer_norm(x)

    def _head(self, x):
        proj = getattr(self, "output_proj", None)  # set by quantize_decoder: an int8 copy of the tied rows
        if proj is not None:
            return proj(x)
        return x @ self._output_weight().T

    def _output_weight(self):
        return self.embed_tokens.weight[: self.config.n_logits]

    def _head_tensor(self):
        return self.embed_tokens.weight


# ----------------------------------------------------------------------------------------------------------
# Whisper's audio encoder (the frozen front end of every model; encoder.py feeds it log-mel features)


class EncoderSelfAttention(WhisperAttention):
    """Bidirectional self-attention with the queries scaled before the product, as openai/whisper and
    transformers do (not inside it): the same rounding, so states match theirs to float precision."""

    def forward(self, x):
        B, T, C = x.shape
        q = (self.q_proj(x) * self.head_size**-0.5).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k, v = self.keys_values(x)
        y = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=1.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class AudioEncoderBlock(nn.Module):
    def __init__(self, dims: AudioEncoderDims):
        super().__init__()
        d = dims.n_state
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = EncoderSelfAttention(d, dims.n_head)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, dims.n_mlp)
        self.fc2 = nn.Linear(dims.n_mlp, d)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # transformers' guard against fp16 overflow, kept for identical states
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(min=-limit, max=limit)
        return x


class AudioEncoder(nn.Module):
    """openai/whisper's AudioEncoder: a conv stem (the second conv halves the frame rate), the position
    table, pre-norm blocks, a final norm. Parameter names are transformers' WhisperEncoder's, so a Whisper
    checkpoint's `model.encoder.*` tensors load as they are.

    forward takes log-mel features [B, n_mels, M] of any even M <= 2 * n_ctx and uses the first M/2 rows of
    the position table (upstream always feeds M = 3000, i.e. 30 s)."""

    def __init__(self, dims: AudioEncoderDims):
        super().__init__()
        self.dims = dims
        self.conv1 = nn.Conv1d(dims.n_mels, dims.n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.n_state, dims.n_state, kernel_size=3, stride=2, padding=1)
        self.embed_positions = Embedding(dims.n_ctx, dims.n_state)
        self.layers = nn.ModuleList(AudioEncoderBlock(dims) for _ in range(dims.n_layer))
        self.layer_norm = nn.LayerNorm(dims.n_state)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        if x.shape[1] > self.dims.n_ctx:
            raise ValueError(f"{mel.shape[-1]} mel frames exceed the encoder's {2 * self.dims.n_ctx}")
        x = x + self.embed_positions.weight[: x.shape[1]].to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


def build_decoder(config: ModelConfig) -> DecoderBase:
    return DiffusionDecoder(config) if config.family == "smdm" else WhisperDiffusionDecoder(config)


def quantize_decoder(decoder: DecoderBase, head: bool = True, inplace: bool = False) -> DecoderBase:
    """A copy of `decoder` with int8 dynamic quantisation of its Linear layers (CPU, float32 weights);
    inplace: `decoder` itself, its float Linear layers replaced (no float copy of them is kept).

    Weights are int8 per output channel; activations are quantised per call from their range, so results
    are close to float but not identical, and a window's tokens may depend on what else is in the batch.
    head: also quantise the output projection. The Whisper family's projection is the tied token table
    (`x @ embed_tokens.weight[:n].T`, not a Linear), so an int8 Linear copy of those rows (`output_proj`)
    replaces it; the embedding itself stays float.
    """
    import copy

    if decoder.device.type != "cpu" or decoder.dtype != torch.float32:
        raise ValueError("int8 decoder quantisation needs a float32 decoder on the CPU")
    model = (decoder if inplace else copy.deepcopy(decoder)).eval()
    if head and isinstance(model, WhisperDiffusionDecoder):
        # A view of the table's rows, not a copy: quantisation reads it once to make the int8 weight.
        rows = model.embed_tokens.weight[: model.config.n_logits].detach()
        with torch.device("meta"):
            model.output_proj = nn.Linear(rows.size(1), rows.size(0), bias=False)
        model.output_proj.weight = nn.Parameter(rows, requires_grad=False)
    skip = set() if head else {"lm_head"}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip}
    return quantize_linears(model, linears).requires_grad_(False)


def quantize_linears(module: nn.Module, names: set[str] | None = None) -> nn.Module:
    """`module` itself with its Linear layers (those named in `names`; None: all) replaced by int8 dynamic
    quantised ones (CPU). In place: the module is the caller's to give up (a copy where it must survive),
    and quantize_dynamic would otherwise deep-copy it once more."""
    import warnings

    # torch warns that its eager quantisation API moves to torchao; it still works in the pinned torch.
    with warnings.catch_warnings():
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        spec = {nn.Linear} if names is None else names
        return torch.ao.quantization.quantize_dynamic(module, spec, dtype=torch.qint8, inplace=True)


def is_adapter_key(name: str) -> bool:
    """The cross-attention adapter of the SMDM family (what stage 1 trains and stores)."""
    return "cross_attn" in name or "norm_cross" in name or name.startswith("condition_proj")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Random init for training from scratch: normal(0, std) linears/embeddings, unit norm gains."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        elif "mask_embedding" in name:
            nn.init.normal_(p, 0.0, std)
        else:
            nn.init.ones_(p)
