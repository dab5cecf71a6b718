"""Training data: transcribed audio in, encoder-state shards out, and a dataset that reads them back.

`whisfusion preprocess` runs the frozen Whisper encoder once per utterance and stores the states with their
transcripts in safetensors shards (upstream stores one 1500x768 file per utterance, ~700 GB for LibriSpeech
960 h). Every shard holds its items' states concatenated into one [sum F_i, d] tensor plus offsets, so both
frame modes share one format: "full" keeps all 1500 frames of the 30 s window (what upstream trains on), the
"pad_trim" and "short" encoder modes keep only the frames covering the audio (~10x smaller for 3 s clips).

Resumable and parallel by construction: items are cut into shards in input order (shard i = items
[i*S, (i+1)*S)), rank r of w writes the shards with i % w == r, each shard is written to a temporary file and
renamed into place, and a shard file that exists is finished. A restart recomputes the same plan and skips
finished shards, so an interrupted and resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import first_line
from .choices import STORE_DTYPES
from .fileio import atomic_path, write_atomic

FORMAT = "whisfusion-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
# One metadata key holding sorted JSON: safetensors keeps metadata in a hash map, whose order is not stable.
META_KEY = "whisfusion"
DEFAULT_SHARD_SIZE = 512  # utterances per shard: ~100 MB of 3 s clips in "short" mode at d=768, fp16
DEFAULT_BATCH_SIZE = 8
MAX_SECONDS = 30.0  # one Whisper window; longer utterances are reported and skipped
UPSTREAM_BYTES_PER_ITEM = 1500 * 768 * 2  # one bf16 [1500, 768] file per utterance (SPEC section 4)
MANIFEST_AUDIO_KEYS = ("audio", "audio_filepath", "path", "file", "filename", "wav")
MANIFEST_TEXT_KEYS = ("text", "transcript", "sentence", "transcription")


class DatasetError(Exception):
    """A dataset or shard directory that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Item:
    id: str
    audio: str  # absolute path
    text: str
    start: float | None = None  # seconds into the file
    end: float | None = None


# ----------------------------------------------------------------------------------------------------------
# Reading datasets


def read_dataset(path: str | os.PathLike) -> list[Item]:
    """Items of a LibriSpeech-layout tree (`*.trans.txt` beside the audio), a JSONL or CSV/TSV manifest
    (audio path relative to the manifest, text, optional start/end seconds and id), or a folder of audio
    files with same-name `.txt` transcripts. Order is deterministic (sorted paths, or manifest order)."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or directory")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            items = _read_jsonl(p)
        elif suffix in (".csv", ".tsv"):
            items = _read_csv(p, delimiter="\t" if suffix == ".tsv" else ",")
        else:
            raise DatasetError(f"{p}: unknown manifest type (expected .jsonl, .csv or .tsv)")
    elif next(p.rglob("*.trans.txt"), None) is not None:
        items = _read_librispeech(p)
    else:
        items = _read_folder(p)
    if not items:
        raise DatasetError(f"{p}: no transcribed audio found")
    return _unique_ids(items)


def _read_librispeech(root: Path) -> list[Item]:
    from .audio import AUDIO_EXTENSIONS

    items = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            audio = next((trans.parent / (utt + ext) for ext in (".flac", *sorted(AUDIO_EXTENSIONS))
                          if (trans.parent / (utt + ext)).exists()), trans.parent / (utt + ".flac"))
            items.append(Item(id=utt, audio=str(audio.resolve()), text=text.strip()))
    return items


def _read_folder(root: Path) -> list[Item]:
    from .audio import AUDIO_EXTENSIONS

    items = []
    for audio in sorted(q for q in root.rglob("*") if q.suffix.lower() in AUDIO_EXTENSIONS and q.is_file()):
        txt = audio.with_suffix(".txt")
        if txt.exists():
            rel = audio.relative_to(root).with_suffix("")
            items.append(Item(id=rel.as_posix(), audio=str(audio.resolve()),
                              text=" ".join(txt.read_text(encoding="utf-8").split())))
    return items


def _manifest_item(row: dict, base: Path, where: str) -> Item:
    audio = next((row[k] for k in MANIFEST_AUDIO_KEYS if row.get(k) not in (None, "")), None)
    text = next((row[k] for k in MANIFEST_TEXT_KEYS if k in row and row[k] is not None), None)
    if audio is None:
        raise DatasetError(f"{where}: no audio path (one of {', '.join(MANIFEST_AUDIO_KEYS)})")
    if text is None:
        raise DatasetError(f"{where}: no transcript (one of {', '.join(MANIFEST_TEXT_KEYS)})")

    def seconds(key):
        value = row.get(key)
        if value in (None, ""):
            return None
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: {key}={value!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < 0:
            raise DatasetError(f"{where}: {key}={value!r} is not a valid time")
        return value

    start, end = seconds("start"), seconds("end")
    if start is not None and end is not None and end <= start:
        raise DatasetError(f"{where}: end {end} is not after start {start}")
    audio_path = (base / str(audio)).resolve()
    item_id = row.get("id")
    if item_id in (None, ""):
        item_id = Path(str(audio)).with_suffix("").as_posix()
        if start is not None or end is not None:
            item_id += f"_{start or 0:.2f}_{end if end is not None else 'end'}"
    return Item(id=str(item_id), audio=str(audio_path), text=" ".join(str(text).split()), start=start, end=end)


def _read_jsonl(path: Path) -> list[Item]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{n}: expected a JSON object per line")
        items.append(_manifest_item(row, path.parent, f"{path}:{n}"))
    return items


def _read_csv(path: Path, delimiter: str) -> list[Item]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise DatasetError(f"{path}: empty manifest (expected a header row)")
        return [_manifest_item(row, path.parent, f"{path}:{n}") for n, row in enumerate(reader, 2)]


def _unique_ids(items: list[Item]) -> list[Item]:
    seen: dict[str, int] = {}
    out = []
    for item in items:
        count = seen.get(item.id, 0)
        seen[item.id] = count + 1
        out.append(item if count == 0 else Item(f"{item.id}#{count}", item.audio, item.text, item.start, item.end))
    return out


def dataset_fingerprint(items: list[Item]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(asdict(item), sort_keys=True).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Writing shards


@dataclass
class PreprocessOptions:
    input: str
    output: str
    encoder: dict = field(default_factory=lambda: {"source": "tiny.en", "mode": "short"})  # encoder.load_encoder spec
    dtype: str = "float16"
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str | None = None  # None: cuda:LOCAL_RANK where available, else cpu
    progress: bool = True

    def __post_init__(self):
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be >= 1")


class _AudioReader:
    """Loads one item's audio; keeps the last file so that manifest segments of one recording load it once."""

    def __init__(self):
        self._path, self._audio = None, None

    def __call__(self, item: Item):
        from .audio import SAMPLE_RATE, load_audio

        if not os.path.exists(item.audio):
            raise FileNotFoundError("audio file not found")
        if self._path != item.audio:
            self._path, self._audio = None, None
            self._audio = load_audio(item.audio)
            self._path = item.audio
        audio = self._audio
        if item.start is not None or item.end is not None:
            a = int(round((item.start or 0.0) * SAMPLE_RATE))
            b = len(audio) if item.end is None else int(round(item.end * SAMPLE_RATE))
            if a >= len(audio):
                raise ValueError(f"start {item.start} s is past the end of the audio ({len(audio) / SAMPLE_RATE:.2f} s)")
            audio = audio[a:b]
        seconds = len(audio) / SAMPLE_RATE
        if seconds > MAX_SECONDS + 1e-3:
            raise ValueError(f"{seconds:.1f} s is longer than one {MAX_SECONDS:.0f} s encoder window")
        if len(audio) == 0:
            raise ValueError("empty audio")
        return audio


class ShardWriter:
    """Encodes one shard's items and writes `shard-XXXXX.safetensors` atomically."""

    def __init__(self, encoder, options: PreprocessOptions):
        self.encoder, self.options = encoder, options
        self.read_audio = _AudioReader()

    def write(self, index: int, items: list[Item], path: Path, on_item=None) -> dict:
        import numpy as np
        import torch
        from safetensors.torch import save_file

        from .audio import SAMPLE_RATE

        store_dtype = getattr(torch, self.options.dtype)
        loaded, skipped = [], []
        for item in items:
            try:
                loaded.append((item, self.read_audio(item)))
            except Exception as e:  # any unreadable file is reported and skipped, never fatal
                skipped.append({"id": item.id, "audio": item.audio, "error": first_line(e)})
                if on_item:
                    on_item(1)
        # Batch items of similar length (deterministic: stable sort by length) so "short" mode pads little.
        order = sorted(range(len(loaded)), key=lambda i: len(loaded[i][1]))
        states: list = [None] * len(loaded)
        bs = self.options.batch_size
        for b in range(0, len(order), bs):
            batch = order[b : b + bs]
            with torch.inference_mode():
                out = self.encoder.encode([np.asarray(loaded[i][1], dtype=np.float32) for i in batch])
            for i, s in zip(batch, out):
                states[i] = s.detach().to("cpu", store_dtype).contiguous()
            if on_item:
                on_item(len(batch))
        dim = int(self.encoder.dim)
        lengths = [int(s.shape[0]) for s in states]
        offsets = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64)
        tensor = torch.cat(states) if states else torch.zeros(0, dim, dtype=store_dtype)
        meta = {
            "shard": index,
            "dim": dim,
            "dtype": self.options.dtype,
            "items": [
                {**asdict(item), "frames": n, "duration": round(len(audio) / SAMPLE_RATE, 4)}
                for (item, audio), n in zip(loaded, lengths)
            ],
            "skipped": skipped,
        }
        with atomic_path(path) as tmp:
            save_file({"states": tensor, "offsets": offsets}, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        return meta


def read_shard_meta(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
    except Exception as e:
        raise DatasetError(f"{path}: not a readable safetensors shard ({first_line(e)})") from None
    if meta is None:
        raise DatasetError(f"{path}: not a whisfusion shard (no '{META_KEY}' metadata)")
    return json.loads(meta)


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def preprocess(options: PreprocessOptions, encoder=None, console=None) -> dict:
    """Encode a dataset into shards under options.output; returns the index (also written to index.json).

    Under torchrun every rank encodes its own shards (i % world == rank) and rank 0 writes the index once
    all ranks are done. `encoder` may be passed in (tests); otherwise it is built from options.encoder.
    """
    from .distributed import Group

    # The group has this rank's device current and the long collective timeout: ranks wait for each other
    # only at the end, however long their shards take.
    group = Group.start(options.device if encoder is None else "cpu")
    try:
        index = _preprocess_ranks(options, encoder, console, group)
        group.barrier()  # all ranks are done with the group before any tears it down
        return index
    finally:
        group.close()


def _preprocess_ranks(options: PreprocessOptions, encoder, console, group) -> dict:
    rank, world = group.rank, group.world
    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    items = read_dataset(options.input)
    n_shards = -(-len(items) // options.shard_size)
    plan = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": str(Path(options.input).resolve()),
        "dataset": dataset_fingerprint(items),
        "num_planned": len(items),
        "num_shards": n_shards,
        "shard_size": options.shard_size,
        "batch_size": options.batch_size,
        "encoder": options.encoder,
        "dtype": options.dtype,
    }
    plan_path = out / PLAN_FILE
    if plan_path.exists():
        old = json.loads(plan_path.read_text(encoding="utf-8"))
        diff = sorted(k for k in plan if old.get(k) != plan[k])
        if diff:
            raise DatasetError(
                f"{out}: holds shards of a different run (differs in {', '.join(diff)}); use a new output folder"
            )
    elif rank == 0:
        _write_json(plan_path, plan)

    mine = [i for i in range(n_shards) if i % world == rank]
    todo = [i for i in mine if not (out / SHARD_PATTERN.format(i)).exists()]
    for stale in out.glob(".shard-*.tmp"):  # left by a killed run; never renamed, so never trusted
        if int(stale.name.split(".")[1].split("-")[1]) % world == rank:
            stale.unlink(missing_ok=True)

    error = None
    try:
        _encode_shards(options, encoder, console, group, items, todo, len(mine))
    except Exception as e:  # every rank learns that one failed, instead of waiting for it
        if world == 1:
            raise
        error = f"{type(e).__name__}: {first_line(e, limit=None)}"
    group.check(error, DatasetError)

    def finish() -> dict:
        index = write_index(out, plan)
        if options.progress:
            print_size_report(index, console)
        return index

    return group.on_main(finish)


def _encode_shards(options: PreprocessOptions, encoder, console, group, items: list[Item], todo: list[int],
                   n_mine: int) -> None:
    from .display import progress

    out = Path(options.output)
    if todo:
        if encoder is None:
            from .encoder import load_encoder

            spec = {"batch_size": options.batch_size, **options.encoder}
            encoder = load_encoder(spec, device=group.device)
        writer = ShardWriter(encoder, options)
        total = sum(len(items[i * options.shard_size : (i + 1) * options.shard_size]) for i in todo)
        with progress(options.progress and group.is_main, console) as bar:
            task = bar.add_task(f"encoding ({len(todo)}/{n_mine} shards left)", total=total)
            for i in todo:
                shard_items = items[i * options.shard_size : (i + 1) * options.shard_size]
                writer.write(i, shard_items, out / SHARD_PATTERN.format(i), on_item=lambda n: bar.advance(task, n))


def write_index(out: Path, plan: dict) -> dict:
    shards, skipped = [], []
    n_items = frames = 0
    seconds = 0.0
    dim = frame_counts = None
    for i in range(plan["num_shards"]):
        path = out / SHARD_PATTERN.format(i)
        if not path.exists():
            raise DatasetError(f"{path}: missing shard (a rank did not finish); run preprocess again to resume")
        meta = read_shard_meta(path)
        dim = meta["dim"]
        f = sum(it["frames"] for it in meta["items"])
        shards.append({"file": path.name, "items": len(meta["items"]), "frames": f, "bytes": path.stat().st_size})
        n_items += len(meta["items"])
        frames += f
        seconds += sum(it["duration"] for it in meta["items"])
        skipped.extend(meta["skipped"])
        counts = {it["frames"] for it in meta["items"]}
        frame_counts = counts if frame_counts is None else frame_counts | counts
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "encoder": {**plan["encoder"], "dim": dim},
        "frame_mode": plan["encoder"].get("mode", "full"),
        "fixed_frames": next(iter(frame_counts)) if frame_counts and len(frame_counts) == 1 else None,
        "dtype": plan["dtype"],
        "dim": dim,
        "num_items": n_items,
        "num_frames": frames,
        "audio_seconds": round(seconds, 3),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "skipped": skipped,
        "source": plan["source"],
        "dataset": plan["dataset"],
    }
    _write_json(out / INDEX_FILE, index)
    return index


def print_size_report(index: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console(stderr=True)
    n = max(index["num_items"], 1)
    hours = index["audio_seconds"] / 3600
    upstream = UPSTREAM_BYTES_PER_ITEM * index["num_items"]
    console.print(
        f"{index['num_items']} utterances ({hours:.2f} h) in {len(index['shards'])} shards: "
        f"{index['bytes'] / 1e6:.1f} MB ({index['bytes'] / n / 1e3:.1f} kB per utterance, "
        f"{index['num_frames'] / n:.0f} frames of {index['dim']} in {index['dtype']}); "
        f"upstream's one-file-per-utterance layout would take {upstream / 1e6:.1f} MB"
    )
    if index["skipped"]:
        console.print(f"[yellow]{len(index['skipped'])} file(s) skipped:[/yellow]")
        for s in index["skipped"][:20]:
            console.print(f"  {s['audio']}: {s['error']}")
        if len(index["skipped"]) > 20:
            console.print(f"  ... and {len(index['skipped']) - 20} more (all listed in index.json)")


def preprocess_main(**kwargs) -> dict:
    """CLI entry: keyword arguments are PreprocessOptions fields; `encoder_source`, `encoder_mode` and
    `encoder_int8` fill the encoder spec."""
    spec = dict(kwargs.pop("encoder", None) or {})
    for key in ("source", "mode", "int8"):
        value = kwargs.pop(f"encoder_{key}", None)
        if value is not None:
            spec[key] = value
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    options = PreprocessOptions(**kwargs, encoder={"source": "tiny.en", "mode": "short", **spec})
    return preprocess(options)


# ----------------------------------------------------------------------------------------------------------
# Reading shards


@dataclass(frozen=True)
class ShardItem:
    id: str
    text: str
    frames: int
    duration: float
    shard: int
    row: int  # position in the shard


class ShardDataset:
    """The utterances of one or more shard folders (concatenated, in the order given); states are read lazily
    from the memory-mapped safetensors files. Folders must come from the same encoder (same width)."""

    def __init__(self, path: str | os.PathLike | list):
        roots = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        if not roots:
            raise DatasetError("no shard folder given")
        self.root = roots[0]
        self.items: list[ShardItem] = []
        self._files: list[Path] = []
        self.dim = self.encoder = None
        for root in roots:
            index = self._read_index(root)
            if self.dim is None:
                self.dim, self.encoder = index["dim"], index["encoder"]
            elif index["dim"] != self.dim:
                raise DatasetError(f"{root}: encoder states of width {index['dim']}, {roots[0]} has {self.dim}")
            for shard in index["shards"]:
                file = root / shard["file"]
                if not file.exists():
                    raise DatasetError(f"{file}: missing shard listed in {root / INDEX_FILE}")
                meta = read_shard_meta(file)
                if meta["dim"] != self.dim:
                    raise DatasetError(f"{file}: states of width {meta['dim']}, index says {self.dim}")
                s = len(self._files)
                self._files.append(file)
                for row, it in enumerate(meta["items"]):
                    self.items.append(ShardItem(it["id"], it["text"], it["frames"], it["duration"], s, row))
        self._handles: dict = {}

    @staticmethod
    def _read_index(root: Path) -> dict:
        index_path = root / INDEX_FILE
        if not index_path.exists():
            hint = " (preprocess did not finish: run it again to resume)" if (root / PLAN_FILE).exists() else ""
            raise DatasetError(f"{index_path}: missing shard index{hint}")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{index_path}: not valid JSON ({e.msg})") from None
        if index.get("format") != FORMAT:
            raise DatasetError(f"{index_path}: not a whisfusion shard index")
        return index

    def __len__(self) -> int:
        return len(self.items)

    def _handle(self, shard: int):
        from safetensors import safe_open

        h = self._handles.get(shard)
        if h is None:
            f = safe_open(str(self._files[shard]), framework="pt")
            h = self._handles[shard] = (f, f.get_tensor("offsets").tolist())
        return h

    def states(self, i: int):
        """Encoder states of item i, [frames, dim], in the stored dtype."""
        item = self.items[i]
        f, offsets = self._handle(item.shard)
        return f.get_slice("states")[offsets[item.row] : offsets[item.row + 1]]



def collate_states(states: list, dtype=None):
    """Pad a batch of states [F_i, d] with zeros to the longest -> (condition [B, F, d], frame_mask [B, F]).

    Training passes frame_mask.sum(1) to the decoder as `frames=`, which masks the padding out of
    cross-attention (as inference does); batches are also grouped by length (`length_grouped_batches`), so
    little compute goes to padding. In "full" mode every item has 1500 frames and there is no padding at all.
    """
    import torch

    n = max(s.shape[0] for s in states)
    d = states[0].shape[1]
    dtype = dtype or states[0].dtype
    cond = torch.zeros(len(states), n, d, dtype=dtype)
    mask = torch.zeros(len(states), n, dtype=torch.bool)
    for b, s in enumerate(states):
        cond[b, : s.shape[0]] = s.to(dtype)
        mask[b, : s.shape[0]] = True
    return cond, mask
