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

import tempfile
from pathlib import Path

from other_voices import copy_clip, output_folder, unpack, write_manifest  # scripts/other_voices.py

PACKAGE, ROOT = "klettres-data", "usr/share/klettres"
LICENSE = "GPL-2.0-or-later (Debian klettres-data, {lang}/syllab)"
LANGUAGES = ("en", "en_GB")
NOT_WORDS = {"aw", "ch", "th"}  # sounds, not words
IN_TUNE_SET = {"ball", "car", "ear", "well"}  # scripts/other_voices.py holds these words


def main() -> None:
    out = output_folder(__doc__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(PACKAGE, Path(tmp))
        for lang in LANGUAGES:
            for ogg in sorted((root / ROOT / lang / "syllab").glob("*.ogg")):
                if ogg.stem not in NOT_WORDS | IN_TUNE_SET:
                    rows.append(copy_clip(ogg, f"klettres_{lang}_{ogg.name}", ogg.stem, LICENSE.format(lang=lang),
                                          out))
    write_manifest(rows, out / "report.jsonl")


if __name__ == "__main__":
    main()
