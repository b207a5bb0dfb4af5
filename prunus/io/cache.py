"""The one prunus cache root: fetched books, cached model copies and downloaded datasets live under it.

``$PRUNUS_CACHE`` if set, else ``~/.cache/prunus``. (``$PRUNUS_DATA``, the name the training tasks once
read, is still honoured when ``$PRUNUS_CACHE`` is unset.)

Example:
    >>> os.environ["PRUNUS_CACHE"] = "/tmp/pc"; str(cache_root())   # doctest: +SKIP
    '/tmp/pc'
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created here)."""
    env = os.environ.get("PRUNUS_CACHE") or os.environ.get("PRUNUS_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prunus"
