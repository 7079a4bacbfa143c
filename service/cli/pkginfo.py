"""pclitectl's own version, found without importing importlib.metadata (which costs more than a short run)."""

from __future__ import annotations

import os
import sys

_version: str | None = None


def client_version() -> str:
    """pclite's installed version, as importlib.metadata.version("pclite") answers (cached).

    The first pclite-*.dist-info/.egg-info along sys.path is read directly: importing importlib.metadata costs more
    than the rest of a typical pclitectl run. Anything unusual falls back to importlib.metadata itself.
    """
    global _version
    if _version is None:
        _version = _version_from_path() or _version_from_metadata()
    return _version


def _version_from_path() -> str | None:
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            low = name.lower()
            if not low.endswith((".dist-info", ".egg-info")) or low.split("-", 1)[0].rsplit(".", 1)[0] != "pclite":
                continue
            folder = os.path.join(entry or ".", name)
            meta = os.path.join(folder, "METADATA" if low.endswith(".dist-info") else "PKG-INFO")
            try:
                with open(meta if os.path.isdir(folder) else folder, encoding="utf-8") as handle:
                    for line in handle:
                        if not line.strip():
                            break
                        if line.startswith("Version:"):
                            return line[len("Version:"):].strip() or None
            except (OSError, UnicodeDecodeError):
                return None
            return None
    return None


def _version_from_metadata() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pclite")
    except PackageNotFoundError:
        return "0+unknown"
