"""A tiny random whisfusion model directory (and its parts) for structure tests.

Random weights make garbage text; the tests that use this check plumbing (windows, batching, outputs,
errors), never transcript quality. Everything is small enough to build in about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["the", "a", "and", "of", "to", "ten", "clubs", "go", "forward", "country", "you", "ask", "what", "can",
         "do", "for", "your", "man", "he", "was"]
D_MODEL = 16


def make_tokenizer(path: Path) -> Path:
    """A word-level tokenizers file with Llama's special ids (<unk> 0, <s> 1, </s> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path))
    return path


def make_whisper(path: Path) -> Path:
    """A transformers Whisper with a 1-layer, 16-wide encoder (30 s windows, 80 mels like the real ones)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=D_MODEL, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    WhisperForConditionalGeneration(cfg).save_pretrained(path)
    return path


def random_whisper(seed: int = 0, **config):
    """A random transformers WhisperForConditionalGeneration (eval mode) with non-zero biases and norms, so
    a swapped or dropped bias cannot go unnoticed in a comparison."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_decoder(seed: int = 0):
    import torch

    from whisfusion_cli.model import ModelConfig, build_decoder, init_weights

    torch.manual_seed(seed)
    cfg = ModelConfig(family="smdm", name="tiny", n_layer=1, n_head=2, n_embd=D_MODEL, intermediate_size=32,
                      vocab_size=len(WORDS) + 3, padding_multiple=8, block_size=64)
    decoder = build_decoder(cfg)
    init_weights(decoder, std=0.5)  # large weights: confident, varied random tokens
    return decoder.eval()


TINY_DECODING = {"candidates": 2, "steps": 2, "seq_len": None, "max_seq_len": 24}


def make_model_dir(root: Path) -> Path:
    """root/model: a complete model directory (config.json, model.safetensors, tokenizer.json)."""
    from whisfusion_cli.checkpoint import save_model_dir
    from whisfusion_cli.tokenizer import TokenizerConfig

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    whisper = make_whisper(root / "whisper")
    tok = make_tokenizer(root / "tokenizer.json")
    return save_model_dir(
        root / "model", make_decoder(), tok, TokenizerConfig().to_dict(),
        {"source": str(whisper), "mode": "pad_trim", "dim": D_MODEL}, decoding_defaults=TINY_DECODING,
    )


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
