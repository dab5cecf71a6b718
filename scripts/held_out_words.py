"""A report set of isolated words no choice has seen: KLettres' spoken example words (Debian klettres-data).

The tune set of other voices (scripts/other_voices.py) chose how verification treats isolated words, so it
cannot also report on them. KLettres, a KDE alphabet game, ships other recordings: its English and British
English example words (`usr/share/klettres/{en,en_GB}/syllab/*.ogg`, the text is the file's name). Its letter
names and bare sounds ("aw", "ch", "th") are left out, and so are the words the tune set holds (ball, car,
ear, well), so that no word of this set chose anything. GPL-2.0-or-later (KDE), like KTuberling's.

    python scripts/held_out_words.py OUT    # apt-get download + dpkg -x (no root needed)

writes OUT/wav/* (the package's own files, read as they are) and OUT/report.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import soundfile as sf

from other_voices import unpack  # scripts/other_voices.py: apt-get download + dpkg -x

PACKAGE, ROOT = "klettres-data", "usr/share/klettres"
LICENSE = "GPL-2.0-or-later (Debian klettres-data, {lang}/syllab)"
LANGUAGES = ("en", "en_GB")
NOT_WORDS = {"aw", "ch", "th"}  # sounds, not words
IN_TUNE_SET = {"ball", "car", "ear", "well"}  # scripts/other_voices.py holds these words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        sys.exit("error: needs apt-get and dpkg (Debian or Ubuntu) to fetch the package")
    (args.out / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(PACKAGE, Path(tmp))
        for lang in LANGUAGES:
            for ogg in sorted((root / ROOT / lang / "syllab").glob("*.ogg")):
                if ogg.stem in NOT_WORDS or ogg.stem in IN_TUNE_SET:
                    continue
                name = f"klettres_{lang}_{ogg.name}"
                shutil.copy(ogg, args.out / "wav" / name)
                rows.append({"id": Path(name).stem, "audio": f"wav/{name}", "text": ogg.stem,
                             "duration": round(sf.info(ogg).duration, 3), "license": LICENSE.format(lang=lang)})
    tmp = args.out / "report.jsonl.part"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(args.out / "report.jsonl")
    print(f"{len(rows)} clips, {sum(r['duration'] for r in rows):.1f} s -> {args.out / 'report.jsonl'}")


if __name__ == "__main__":
    main()
