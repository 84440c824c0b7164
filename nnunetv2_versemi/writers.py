"""One writer per dataset, temporary folders of dead processes, and moving finished output into place.

Commands that write a dataset or results folder hold a lock for it while they work: a lock file
``.DatasetXXX.lock`` beside the folders it guards, holding the writer's PID, locked with ``flock`` so that the
operating system releases it when the writer dies however it dies (a ``kill -9`` leaves the file, and the next
writer takes it over). A second writer gets :class:`WriterLockError` naming the holder.

Output is written into a temporary folder beside its target (``.<target>.tmp-PID``, ``.versemi_<what>_PID_*``)
and renamed into place at the end; temporaries whose process is gone are removed by the next command that makes
one in the same folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

from nnunetv2_versemi.errors import VerSemiInputError

# the temporaries of merge / extract_task (.DatasetXXX_Name.tmp-PID, .old-PID) and of predict
# (.versemi_predict_PID_random): the PID says whose they are
_TEMPORARY = re.compile(r"\.(?:Dataset\d{3}_.+\.(?:tmp|old)-(\d+)|versemi_[a-z]+_(\d+)_.*)")


class WriterLockError(VerSemiInputError):
    """Another live process is writing the same dataset or folder."""


def pid_alive(pid: int) -> bool:
    """Whether a process of that id exists (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporary folders (and ``.old-PID`` leftovers) in ``folder`` whose process is gone; returns
    the removed paths."""
    removed = []
    for d in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = _TEMPORARY.fullmatch(d)
        if m is None or pid_alive(int(m.group(1) or m.group(2))):
            continue
        path = os.path.join(folder, d)
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def make_temporary_beside(target: str, kind: str | None = None) -> str:
    """A new empty temporary folder in the folder that holds ``target`` (the real one, when ``target`` is a
    symlink, so that the final rename stays on one file system and replaces what the link points at), after
    removing the temporaries of dead processes there. ``kind`` None: ``.<target>.tmp-PID``; else
    ``.versemi_<kind>_PID_<random>``."""
    real = os.path.realpath(target)
    parent = os.path.dirname(real)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent)
    if kind is not None:
        return tempfile.mkdtemp(prefix=f".versemi_{kind}_{os.getpid()}_", dir=parent)
    tmp = os.path.join(parent, f".{os.path.basename(real)}.tmp-{os.getpid()}")
    os.mkdir(tmp)
    return tmp


def move_into_place(tmp: str, target: str, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``target`` (through a symlink: to what it points at). An existing
    target is replaced only with ``overwrite``, checked here, at the moment of the rename; raises
    FileExistsError otherwise."""
    final = os.path.realpath(target)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    if not overwrite:
        raise FileExistsError(final)
    old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old-{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.unlink(old)


def _holder(path: str) -> str:
    """The holder of the lock file ``path``; its PID is written just after the holder took the lock, so an
    empty file is read again for up to a second."""
    pid = ""
    for _ in range(20):
        try:
            with open(path) as f:
                pid = f.read().strip()
        except OSError:
            break
        if pid:
            break
        time.sleep(0.05)
    return f"process {pid}" if pid else "another process"


@contextlib.contextmanager
def writer_lock(folder: str, key: str, what: str) -> Iterator[str]:
    """Hold the lock ``<folder>/.<key>.lock`` while the block writes ``what``; raises :class:`WriterLockError`
    naming the holder when another live process holds it. The lock file is removed on the way out."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one writer per dataset is not enforced there
        yield ""
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f".{key}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriterLockError(f"{what} is being written by {_holder(path)} (lock {path}); wait until it "
                                  "has finished") from None
        # the file may have been removed by a writer that finished between our open and our flock: then our
        # lock guards nothing, try again
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def dataset_lock(root: str, dataset_id: int, what: str | None = None) -> contextlib.AbstractContextManager:
    """:func:`writer_lock` for dataset id ``dataset_id`` in ``root`` (nnUNet_raw): one writer per id, whatever
    name it gives the dataset."""
    key = f"Dataset{dataset_id:03d}"
    return writer_lock(root, key, what or f"Dataset id {dataset_id} in {root}")
