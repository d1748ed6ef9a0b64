"""The cache of converted models, and what every loader shares: ModelLoadError, file hashes, JSON files.

`$SPECULANT_CACHE` (default `~/.cache/speculant/models`) holds one folder per converted GGUF,
`<sha256[:16]>-<name>/`, with speculant.json saying where it came from (`source_sha256`) and in which
layout (`format`: CACHE_FORMAT); `gguf/` the embedded GGUFs joined from their part packages;
`tokenizers/` fast tokenizers built for folders that ship only a slow one; file_hashes.json each
file's sha256 under (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

CACHE_FORMAT = 1  # bump when the layout of a converted folder changes: old folders are converted again


class ModelLoadError(ValueError):
    """A model could not be found, converted or loaded; the message says what to do."""


def cache_root() -> Path:
    """$SPECULANT_CACHE, or ~/.cache/speculant/models."""
    root = os.environ.get("SPECULANT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "speculant" / "models"


def is_in_cache(folder: Path) -> bool:
    """Whether `folder` lies inside the cache (then deleting it makes the next load convert again)."""
    return cache_root().resolve() in folder.resolve().parents


def find_converted(sha256: str) -> Path | None:
    """The cache folder converted from the file with this sha256 in the current layout, if any."""
    root = cache_root()
    if not root.is_dir():
        return None
    for folder in root.glob(f"{sha256[:16]}-*"):
        meta = read_json(folder / "speculant.json")
        if meta.get("source_sha256") == sha256 and meta.get("format") == CACHE_FORMAT:
            return folder
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered in the cache under (path, size, mtime) so a reload skips it."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    store = cache_root() / "file_hashes.json"
    known = read_json(store)
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    known = {k: v for k, v in read_json(store).items() if not k.startswith(f"{path}|")}
    known[key] = digest.hexdigest()
    write_json_atomic(store, known)
    return known[key]


def folder_sha256(folder: Path) -> str:
    """sha256 of a folder's weights (*.safetensors, else *.bin): the file's own if there is one."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("*.bin"))
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def slug(text: str) -> str:
    """`text` as a safe folder name: lower case, runs of other characters as one dash."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def say(progress: bool, message: str) -> None:
    """Tell the user on stderr what a slow step is doing, if `progress`."""
    if progress:
        print(f"speculant: {message}", file=sys.stderr, flush=True)


def read_json(path: Path) -> dict:
    """The JSON object in `path`; {} if the file is missing or does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


# ---- measurements kept per setup (step costs, llama.cpp's exact batch width) ---------------------


def keyed_file(folder: str, key: dict, prefix: str = "") -> Path:
    """cache_root()/folder/<prefix><16 hex digits of the key's sha256>.json: one file per setup, the key
    (JSON values only) also written inside it so that a read can check it (read_keyed_json)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / folder / f"{prefix}{digest}.json"


def read_keyed_json(path: Path):
    """The JSON value in a file kept by keyed_file; ValueError naming why it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not readable JSON: {type(error).__name__}") from None


def recalibrate_requested() -> bool:
    """SPECULANT_RECALIBRATE=1: measure what the cache keeps per setup again, and overwrite it."""
    return os.environ.get("SPECULANT_RECALIBRATE", "") not in ("", "0")
