"""files: outputs are written beside their place and renamed into it; nothing a verb did not create is replaced
without --overwrite, and never the current folder, a parent of it, or a folder the verb reads from."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def _contains(outer: Path, inner: Path) -> bool:
    """Whether INNER is OUTER or lies under it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_out(out: Path, overwrite: bool, sources: Iterable[Path] = (), kind: str = "folder",
              flag: str = "--out") -> None:
    """Refuse, in one line, an output path that would destroy something: the current folder or a parent of it, a
    folder this run reads from (SOURCES) or one holding it, whatever its --overwrite; an existing file or non-empty
    folder without --overwrite; a folder where a file is asked for (KIND "file") and the other way round."""
    out = Path(out)
    where = out.expanduser().resolve()
    if _contains(where, Path.cwd().resolve()):
        raise SystemExit(f"error: {flag} {out} is the current folder or a parent of it; give a new folder name "
                         f"(e.g. {flag} ./{'model.gguf' if kind == 'file' else 'my-model'})")
    for src in sources:
        if src is not None and _contains(where, Path(src).expanduser().resolve()):
            raise SystemExit(f"error: {flag} {out} is (or holds) the input {src}; writing there would destroy it — "
                             f"choose another {flag}")
    if kind == "file" and out.is_dir():
        raise SystemExit(f"error: {flag} {out} is a folder; give a file path such as {out / 'model.gguf'}")
    if kind == "folder" and out.exists() and not out.is_dir():
        raise SystemExit(f"error: {flag} {out} is a file; give a folder path")
    exists = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if exists and not overwrite:
        raise SystemExit(f"error: {out} already exists; pass --overwrite to replace it, or choose another {flag}")


def temp_beside(out: Path) -> Path:
    """A fresh temporary path in OUT's folder (same file system, so the final rename is atomic)."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write temp file + fsync + rename: a crash leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the fully written folder TMP in place of OUT: an old OUT is renamed aside, TMP renamed in, then the old
    one removed — at every moment OUT is either the old folder or the new one. Callers check OUT first (check_out)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the old one back: a failed run changes nothing
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
