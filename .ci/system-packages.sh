#!/usr/bin/env bash
# System packages the test suite needs (Debian, as root): the offline voices that make test speech and
# the held-out corpus voices. MBROLA's voices live in contrib/non-free. A user's `bash install.sh --test`
# needs no root; run this once (sudo) for the full suite.
set -euo pipefail
PACKAGES="espeak-ng flite mbrola mbrola-us3 sox"
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
for f in /etc/apt/sources.list.d/debian.sources; do
  [ -f "$f" ] && sed -i 's/^Components: main$/Components: main contrib non-free/' "$f"
done
[ -f /etc/apt/sources.list ] && sed -i -E '/^deb /{/contrib/!s/ main$/ main contrib non-free/}' /etc/apt/sources.list
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends $missing
