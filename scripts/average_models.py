"""Average the weights of packaged models trained from the same initialisation (a "model soup").

Models fine-tuned from one pre-trained start (here tiny.en's decoder) stay in one basin, so a weighted mean
of their weights is a model too, often better than either on data neither was tuned for (Wortsman et al.,
"Model soups", 2022). docs/EXPERIMENTS.md ("Weight averaging") measures such means of the default model:

    python scripts/average_models.py OUT MODEL_A:0.5 MODEL_B:0.5

OUT gets the weighted mean of each tensor (weights normalised to sum to 1, computed in float32, stored in the
first model's dtype), the first model's tokenizer, and its config.json with a `training.average` entry that
names the parts. Every model must hold the same tensor names and shapes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def average(parts: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """The weighted mean of state dicts, tensor by tensor, in float32; each result in the first one's dtype."""
    first = parts[0][0]
    for state, _ in parts[1:]:
        if state.keys() != first.keys() or any(state[k].shape != first[k].shape for k in first):
            raise ValueError("the models hold different tensors: only models of one architecture average")
    total = sum(w for _, w in parts)
    if total <= 0 or any(w < 0 for _, w in parts):
        raise ValueError("weights must be >= 0 and not all 0")
    return {k: (sum(w * s[k].astype(np.float32) for s, w in parts) / total).astype(v.dtype) for k, v in first.items()}


def parse_part(spec: str) -> tuple[Path, float]:
    path, sep, weight = spec.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected MODEL_DIR:WEIGHT")
    try:
        return Path(path), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: the weight after ':' is not a number") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("parts", nargs="+", type=parse_part, metavar="MODEL_DIR:WEIGHT")
    args = parser.parse_args(argv)
    for directory, _ in args.parts:
        if not (directory / WEIGHTS).is_file():
            sys.exit(f"error: {directory}: no {WEIGHTS} (a packaged model directory is expected)")
    try:
        state = average([(load_file(str(d / WEIGHTS)), w) for d, w in args.parts])
    except ValueError as e:
        sys.exit(f"error: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / (WEIGHTS + ".part")
    save_file(state, str(tmp), metadata={"format": "pt"})  # as package_default.py writes it
    tmp.replace(args.out / WEIGHTS)
    first = args.parts[0][0]
    shutil.copy(first / TOKENIZER, args.out / TOKENIZER)
    config = json.loads((first / CONFIG).read_text())
    config.setdefault("training", {})["average"] = [{"model": d.name, "weight": w} for d, w in args.parts]
    (args.out / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    print(f"averaged {len(args.parts)} models -> {args.out}")


if __name__ == "__main__":
    main()
