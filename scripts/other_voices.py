"""A tune split of other real voices: single words and short phrases from two Debian packages.

The Asterisk tune split is one studio voice, so a candidate that learns that voice and forgets the others
looks good on it. This set holds other speakers, so checkpoints can be judged on more than one voice without
reading a report set:

  ktuberling-data   72 English words and two-word names spoken for KTuberling (sounds/en/*.ogg; the
                    text is the file's name without its playground), GPL-2.0-or-later
  alsa-utils         8 spoken channel names ("Front Left", ...; /usr/share/sounds/alsa), GPL-2.0

Isolated words are hard for every model (Whisper tiny.en too: no context), so its WER is high and moves in
large steps; it is one of three tune sets, never a report set.

With --tuxpaint, also a second tune set of words (2026-12-04), OUT/tuxpaint.jsonl:

  tuxpaint-stamps-default   63 animals' names spoken for Tux Paint's stamps (stamps/animals/**/NAME_desc.ogg;
                            the text is the name, which the recording says, not the stamp's description
                            "A frog."; three names whose spoken form is unknown left out), GPL-2, 160 MB

    python scripts/other_voices.py OUT [--tuxpaint]   # apt-get download + dpkg -x (no root needed)

writes OUT/wav/* (the packages' own files, read as they are) and OUT/tune.jsonl (OUT/tuxpaint.jsonl).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import soundfile as sf

KTUBERLING = ("ktuberling-data", "usr/share/ktuberling/sounds", "GPL-2.0-or-later (Debian ktuberling-data, sounds/en)")
ALSA = ("alsa-utils", "usr/share/sounds/alsa", "GPL-2.0 (Debian alsa-utils, /usr/share/sounds/alsa)")
THEME_PREFIXES = ("egypt_", "moon_", "pizzeria_", "tv_")  # KTuberling's playgrounds, not spoken
TUXPAINT = ("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps/animals", "GPL-2 (Debian tuxpaint-stamps-default)")
TUXPAINT_SPOKEN = {"wildboar": "wild boar", "mountaingoat": "mountain goat"}
TUXPAINT_UNCLEAR = {"xanthia", "nandou", "tucan"}  # which English word is said is not known
# Names whose spelling is not what is said.
SPOKEN = {"palmtree": "palm tree", "fallingstar": "falling star", "sphynx": "sphinx", "broccolli": "broccoli",
          "ufo": "UFO"}


def unpack(package: str, work: Path) -> Path:
    subprocess.run(["apt-get", "download", package], cwd=work, check=True, capture_output=True)
    deb = next(work.glob(f"{package}_*.deb"))
    root = work / package
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def ktuberling_items(root: Path) -> list[tuple[Path, str]]:
    items = []
    for ogg in sorted((root / KTUBERLING[1] / "en").glob("*.ogg")):
        name = ogg.stem
        for prefix in THEME_PREFIXES:
            name = name.removeprefix(prefix)
        items.append((ogg, SPOKEN.get(name, name)))
    return items


def alsa_items(root: Path) -> list[tuple[Path, str]]:
    return [(wav, wav.stem.replace("_", " ")) for wav in sorted((root / ALSA[1]).glob("*.wav")) if wav.stem != "Noise"]


def output_folder(description: str, options: dict | None = None) -> tuple[Path, argparse.Namespace]:
    """(The command line's OUT folder, with OUT/wav made once apt-get and dpkg are known to be there; the parsed
    arguments, OUT and options: {flag: argparse keywords})."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    for flag, keywords in (options or {}).items():
        parser.add_argument(flag, **keywords)
    args = parser.parse_args()
    out = args.out
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        sys.exit("error: needs apt-get and dpkg (Debian or Ubuntu) to fetch the packages")
    (out / "wav").mkdir(parents=True, exist_ok=True)
    return out, args


def copy_clip(source: Path, name: str, text: str, license: str, out: Path) -> dict:
    """A package's audio file copied to out/wav/name as it is, and its manifest row."""
    shutil.copy(source, out / "wav" / name)
    return {"id": Path(name).stem, "audio": f"wav/{name}", "text": text,
            "duration": round(sf.info(source).duration, 3), "license": license}


def write_manifest(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".jsonl.part")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    print(f"{len(rows)} clips, {sum(r['duration'] for r in rows):.1f} s -> {path}")


def tuxpaint_items(root: Path) -> list[tuple[Path, str]]:
    names = sorted((ogg.name[: -len("_desc.ogg")], ogg) for ogg in (root / TUXPAINT[1]).rglob("*_desc.ogg"))
    return [(ogg, TUXPAINT_SPOKEN.get(name, name)) for name, ogg in names if name not in TUXPAINT_UNCLEAR]


def main() -> None:
    out, args = output_folder(__doc__, {"--tuxpaint": dict(action="store_true", help="also OUT/tuxpaint.jsonl")})
    if args.tuxpaint:
        with tempfile.TemporaryDirectory() as tmp:
            items = tuxpaint_items(unpack(TUXPAINT[0], Path(tmp)))
            write_manifest([copy_clip(ogg, f"tuxpaint_{ogg.name}", text, TUXPAINT[2], out) for ogg, text in items],
                           out / "tuxpaint.jsonl")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for (package, _, license), items in ((KTUBERLING, ktuberling_items(unpack(KTUBERLING[0], work))),
                                             (ALSA, alsa_items(unpack(ALSA[0], work)))):
            for source, text in items:
                rows.append(copy_clip(source, f"{package.split('-')[0]}_{source.stem}{source.suffix}", text, license,
                                      out))
    write_manifest(rows, out / "tune.jsonl")


if __name__ == "__main__":
    main()
