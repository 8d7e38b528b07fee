"""Fingerprints of model, adapter and classifier directories: what `repbend eval` keys its generations and
verdicts by, so that a rerun into the same output directory with other weights never reuses their rows.

fingerprint(location) = {"path": absolute directory (or the hub id), "digest": 16 hex digits or None}.
The digest is SHA-256 over, for every file under the directory (sorted by relative path, symlinks followed, hidden
files and the `.cache` folder left out): the relative path, the size, and the contents - whole for files up to
`WHOLE_FILE_BYTES` (configs, tokenizers, adapters, small models), else `SAMPLES` evenly spaced blocks of
`SAMPLE_BYTES` (first and last included) of a large weight file. Sampling keeps a 16 GB model at a few MB read;
it cannot miss a changed file size, a renamed or added file, or a changed header, config or tokenizer, and it reads
every weight shard. A hub id is fingerprinted through its snapshot in the local Hugging Face cache when one is
there, else its digest is None (the id alone then identifies it).
"""
from __future__ import annotations

import hashlib
import os

WHOLE_FILE_BYTES = 64 << 20
SAMPLES = 16
SAMPLE_BYTES = 64 << 10


def _files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if not f.startswith(".")]
    return sorted(out)


def digest_dir(root: str) -> str:
    """The digest of a directory (module docstring)."""
    h = hashlib.sha256()
    for rel in _files(root):
        path = os.path.join(root, rel)
        size = os.path.getsize(path)
        h.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= WHOLE_FILE_BYTES:
                h.update(f.read())
                continue
            for k in range(SAMPLES):
                f.seek(k * (size - SAMPLE_BYTES) // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def _hub_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for marker in ("config.json", "adapter_config.json"):
        hit = try_to_load_from_cache(repo_id, marker)
        if isinstance(hit, str):
            return os.path.dirname(hit)
    return None


def fingerprint(location: str | None) -> dict | None:
    """{"path", "digest"} of a local directory or hub id (module docstring); None for None."""
    if location is None:
        return None
    local = os.path.expanduser(location)
    if os.path.isdir(local):
        return {"path": os.path.abspath(local), "digest": digest_dir(local)}
    snapshot = _hub_snapshot(location)
    return {"path": location, "digest": digest_dir(snapshot) if snapshot else None}
