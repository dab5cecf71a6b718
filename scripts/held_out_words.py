"""Report sets of isolated words no choice has seen, from two Debian packages of alphabet games.

The tune set of other voices (scripts/other_voices.py) chose how verification treats isolated words, so it
cannot also report on them. Two alphabet games ship other recordings, each the text of its file's name:

  klettres  (default) KLettres' English and British English example words, klettres-data
            `usr/share/klettres/{en,en_GB}/syllab/*.ogg`, its letter names and bare sounds ("aw", "ch",
            "th") left out; GPL-2.0-or-later (KDE), like KTuberling's. 34 words.
  qabcs     qABCs' English and British English picture words, qabcs-data
            `usr/share/qabcs/abcs/{en,en_gb}/sounds/words/*.ogg` ("hot_dog" is "hot dog"; one voice, Jordan
            Irwin's, the game's own recordings, "speak_method": "file"); its letter names left out;
            GPL-3+. Added as a report set (2026-12-04) before any model was run on it.

Both leave out the words the tune set holds (IN_TUNE_SET), so that no word of either chose anything: qABCs
then has 147 words (118 US, 29 British).

    python scripts/held_out_words.py OUT [--source qabcs]   # apt-get download + dpkg -x (no root needed)

writes OUT/wav/* (the package's own files, read as they are) and OUT/report.jsonl.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from other_voices import copy_clip, output_folder, unpack, write_manifest  # scripts/other_voices.py

# source: (Debian package, folder of each language's words in it, languages, licence)
SOURCES = {
    "klettres": ("klettres-data", "usr/share/klettres/{lang}/syllab", ("en", "en_GB"),
                 "GPL-2.0-or-later (Debian klettres-data, {lang}/syllab)"),
    "qabcs": ("qabcs-data", "usr/share/qabcs/abcs/{lang}/sounds/words", ("en", "en_gb"),
              "GPL-3+ (Debian qabcs-data, recorded by Jordan Irwin, {lang}/sounds/words)"),
}
NOT_WORDS = {"aw", "ch", "th"}  # KLettres' bare sounds, not words
# The words of both packages that scripts/other_voices.py's tune set holds too.
IN_TUNE_SET = {"ball", "car", "ear", "well", "bicycle", "earth", "hat", "mushroom", "olive", "onion", "star", "tomato",
               "train", "umbrella"}


def main() -> None:
    out, args = output_folder(__doc__, {"--source": dict(choices=sorted(SOURCES), default="klettres")})
    source = args.source
    package, folder, languages, license = SOURCES[source]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(package, Path(tmp))
        for lang in languages:
            for ogg in sorted((root / folder.format(lang=lang)).glob("*.ogg")):
                text = ogg.stem.replace("_", " ")
                if text.lower() not in NOT_WORDS | IN_TUNE_SET:
                    rows.append(copy_clip(ogg, f"{source}_{lang}_{ogg.name}", text, license.format(lang=lang), out))
    write_manifest(rows, out / "report.jsonl")


if __name__ == "__main__":
    main()
