"""Output folders that appear whole or not at all, and never replace a user's other files.

``atomic_directory(path)`` hands out a hidden staging folder beside ``path`` and renames it to ``path``
only when the block finishes; an exception (or a killed process) leaves any previous ``path`` as it was.
An existing ``path`` is replaced only when it holds nothing but checkpoint files (``.json`` and
``.safetensors`` files, as every folder this package writes does): a save pointed at a folder of notes,
a source tree or a downloaded model with its README would otherwise delete them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import Iterator

__all__ = ["STAGING_PREFIX", "CHECKPOINT_FILE_SUFFIXES", "check_replaceable", "atomic_directory"]

# Staging folders start with this; ``latest_checkpoint`` and users can tell them from finished ones.
STAGING_PREFIX = ".staging-"
CHECKPOINT_FILE_SUFFIXES = (".json", ".safetensors")


def check_replaceable(path: str) -> None:
    """Raise ``FileExistsError`` unless ``path`` is absent or a folder of checkpoint files only."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a folder; choose a new output folder")
    foreign = sorted(
        entry.name for entry in os.scandir(path)
        if not (entry.is_file(follow_symlinks=False) and entry.name.endswith(CHECKPOINT_FILE_SUFFIXES))
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(
            f"{path} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} that a checkpoint does not "
            f"({shown}); writing there would delete them: choose a new or empty output folder"
        )


def _give_files_the_umask_mode(folder: str) -> None:
    """chmod every file of ``folder`` to the mode a new file gets under the process umask: safetensors
    writes its files private (0600), unlike everything else the folder holds. A probe file tells the mode
    without setting the umask, which would race with other threads."""
    probe = os.path.join(folder, ".mode-probe")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(os.stat(probe).st_mode)
    os.remove(probe)
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, mode)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a staging folder; on success it replaces ``path`` in one rename (``check_replaceable`` first).

    An existing ``path`` is moved into a ``.staging-<name>.old.*`` folder and deleted after the rename;
    only a crash between those two renames leaves the old contents there instead of at ``path``.
    """
    path = os.path.abspath(path)
    check_replaceable(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.path.basename(path)}.", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _give_files_the_umask_mode(staging)
    check_replaceable(path)  # something else may have written there meanwhile
    if os.path.isdir(path):
        retired = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.path.basename(path)}.old.", dir=parent)
        os.replace(path, os.path.join(retired, "previous"))
        os.replace(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, path)
