"""Writing files and folders so that a reader never sees half of one, and nothing the user did not ask us to
replace is touched.

* :func:`write_text_atomic`: a file written beside its destination and renamed into place.
* :func:`check_destination`: before any work, refuse an output that exists and is not one accel wrote (or the
  current folder itself): one line, nothing touched.
* :func:`new_folder`: a temporary folder beside the destination that replaces it at the end, or is removed on
  failure: an output folder is complete or absent.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from .errors import AccelError


def umask() -> int:
    """The process's file-creation mask (what a normal file or folder's permissions respect)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` beside ``path`` and rename it into place (parent folders created; a failure leaves
    ``path`` as it was and no temporary file behind)."""
    p = Path(path)
    if p.is_dir():
        raise AccelError(f"{p} is a folder, not a file")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600; a normal file respects the umask
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def check_destination(path: str | os.PathLike, is_ours: Callable[[Path], bool], what: str, folder: bool,
                      flag: str = "") -> Path:
    """The absolute destination, after checking that writing there loses nothing: it does not exist, or it is
    an empty folder (``folder``), or ``is_ours(path)`` says accel wrote it (so replacing it is what was asked).
    Raises :class:`AccelError` (one line) otherwise, and for the current folder or one that contains it."""
    name = f"{flag} {path}" if flag else str(path)
    other = f"choose another {flag}" if flag else "choose another path"
    p = Path(os.path.abspath(path))
    if p.exists() or p.is_symlink():
        if folder and not p.is_dir():
            raise AccelError(f"{name} is a file, not a folder: {other}")
        if not folder and p.is_dir():
            raise AccelError(f"{name} is a folder, not a file: {other}")
        empty = folder and not any(p.iterdir())
        if not empty and not is_ours(p):
            raise AccelError(f"{name} exists and is not {what}: refusing to replace it ({other}, or remove it)")
    if folder:
        cwd = Path.cwd()
        if p == cwd or p in cwd.parents:
            raise AccelError(f"{name} is the current folder or contains it: {other}")
    elif p.parent.exists() and not p.parent.is_dir():
        raise AccelError(f"{name}: {p.parent} is a file, not a folder")
    return p


@contextlib.contextmanager
def new_folder(path: str | os.PathLike, is_ours: Callable[[Path], bool] | None = None, what: str = "",
               token: str | None = None, commit: bool = True):
    """Yield a new temporary folder beside ``path``; when the block ends without error it replaces ``path``
    (renamed into place; a previous folder, which :func:`check_destination` allowed, is removed after), else it
    is removed and ``path`` is untouched. ``token`` names the temporary folder (processes that share one pass
    the same token); ``commit=False``: leave the renaming to another process. Folders get normal permissions."""
    path = Path(os.path.abspath(path))
    token = token or uuid.uuid4().hex[:12]
    tmp = path.with_name(f".{path.name}.tmp-{token}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(exist_ok=True)  # mkdir respects the umask (tempfile.mkdtemp would make it 0700)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not commit:
        return
    old = None
    try:
        if path.exists():
            empty = path.is_dir() and not any(path.iterdir())
            if not empty and (is_ours is None or not is_ours(path)):
                raise AccelError(f"{path} changed during the run and is no longer {what}: not replaced; the new "
                                 f"output is in {tmp}")
            old = path.with_name(f".{path.name}.old-{token}")
            os.replace(path, old)
        os.replace(tmp, path)
    except AccelError:
        raise
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
