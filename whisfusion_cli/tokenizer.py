"""Text <-> token ids for the decoders, over a Hugging Face `tokenizers` file.

Two conventions (SPEC section 3 and docs/MODEL_CARD.md):
* SMDM / upstream Whisfusion: Llama-2 SentencePiece (TinyLlama), canvas = [BOS 1] + text, pad = EOS = 2.
* Whisper family: Whisper's GPT-2 BPE, canvas = [<|startoftranscript|>, <|notimestamps|>] + " " + text,
  pad = <|endoftext|>.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

LLAMA_BOS_ID = 1
LLAMA_EOS_ID = 2
WHISPER_EOT_ID = 50256
WHISPER_SOT_ID = 50257
WHISPER_NO_TIMESTAMPS_ID = 50362


@dataclass
class TokenizerConfig:
    kind: str = "llama"  # "llama" | "whisper" | "custom"
    file: str = "tokenizer.json"
    prefix_ids: list[int] = field(default_factory=lambda: [LLAMA_BOS_ID])
    pad_id: int = LLAMA_EOS_ID
    eos_id: int = LLAMA_EOS_ID
    leading_space: bool = False  # Whisper transcripts start with a space token
    # Ids at or above this are special (never part of the text). None: rely on the file's special-token list.
    first_special_id: int | None = None

    @classmethod
    def llama(cls) -> "TokenizerConfig":
        return cls()

    @classmethod
    def whisper(cls) -> "TokenizerConfig":
        return cls(
            kind="whisper",
            prefix_ids=[WHISPER_SOT_ID, WHISPER_NO_TIMESTAMPS_ID],
            pad_id=WHISPER_EOT_ID,
            eos_id=WHISPER_EOT_ID,
            leading_space=True,
            first_special_id=WHISPER_EOT_ID,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


class Tokenizer:
    def __init__(self, tokenizer_file: str | Path, config: TokenizerConfig | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(tokenizer_file)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer file not found")
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises plain Exception on malformed JSON
            raise ValueError(f"{self.path}: not a valid tokenizers file ({str(e).splitlines()[0]})") from None
        self.config = config or TokenizerConfig()

    @property
    def prefix_ids(self) -> list[int]:
        return list(self.config.prefix_ids)

    @property
    def pad_id(self) -> int:
        return self.config.pad_id

    @property
    def eos_id(self) -> int:
        return self.config.eos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text tokens only (no prefix, no pad)."""
        text = text.strip()
        if not text:
            return []
        if self.config.leading_space:
            text = " " + text
        return self._tok.encode(text, add_special_tokens=False).ids

    def build_target(self, text: str, seq_len: int) -> list[int]:
        """prefix + tokens, right-padded with pad to exactly seq_len, truncated (SPEC section 3)."""
        ids = (self.prefix_ids + self.encode(text))[:seq_len]
        return ids + [self.pad_id] * (seq_len - len(ids))

    def text_ids(self, ids, cut_at_pad: bool = True) -> list[int]:
        """The text part of a canvas: prefix removed, cut at the first pad/EOS (unless cut_at_pad is False,
        which keeps upstream's behaviour of decoding every non-special token), special ids dropped."""
        ids = [int(i) for i in ids]
        n = len(self.prefix_ids)
        if ids[:n] == self.prefix_ids:
            ids = ids[n:]
        if cut_at_pad:
            stops = {self.pad_id, self.eos_id}
            for j, t in enumerate(ids):
                if t in stops:
                    ids = ids[:j]
                    break
        first = self.config.first_special_id
        if first is not None:
            ids = [t for t in ids if t < first]
        # Prefix (BOS), pad and end tokens predicted inside the text are structure, not text, even where the
        # tokenizer file does not mark them special.
        structure = {*self.prefix_ids, self.pad_id, self.eos_id}
        return [t for t in ids if t not in structure]

    def decode(self, ids, cut_at_pad: bool = True) -> str:
        return self._tok.decode(self.text_ids(ids, cut_at_pad), skip_special_tokens=True).strip()

    def decode_raw(self, ids) -> str:
        """The text of token ids as the file decodes them (its special tokens skipped), for pieces of a
        transcript such as one word's tokens: no prefix removed, nothing cut, no space stripped (`decode`
        reads a whole canvas)."""
        return self._tok.decode(list(ids))

    def pieces(self):
        """Every token as the file spells it (Whisper BPE's "Ġthe", SentencePiece's "▁the"), in id order, one
        at a time: a caller that stops early reads a few of them (get_vocab builds all 50k, 0.18 s)."""
        for i in range(self._tok.get_vocab_size(with_added_tokens=True)):
            piece = self._tok.id_to_token(i)
            if piece is not None:
                yield piece

    def piece(self, token_id: int) -> str:
        """One token as the file spells it; "" for an id the file does not have."""
        return self._tok.id_to_token(int(token_id)) or ""
