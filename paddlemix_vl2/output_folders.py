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


def _give_the_umask_modes(folder: str) -> None:
    """chmod ``folder`` and its files to the modes new ones get under the process umask: mkdtemp makes the
    folder private (0700) and safetensors writes its files private (0600), unlike everything else a user
    creates. Probes tell the modes without setting the umask, which would race with other threads."""
    probe_file, probe_dir = os.path.join(folder, ".mode-probe"), os.path.join(folder, ".mode-probe-dir")
    os.close(os.open(probe_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    os.mkdir(probe_dir, 0o777)
    file_mode, dir_mode = (stat.S_IMODE(os.stat(probe).st_mode) for probe in (probe_file, probe_dir))
    os.remove(probe_file)
    os.rmdir(probe_dir)
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, file_mode)
    os.chmod(folder, dir_mode)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a staging folder; on success it replaces ``path`` in one rename (``check_replaceable`` first).

    An existing ``path`` is moved into a ``.staging-<name>.old.*`` folder and deleted after the rename
    (put back if the rename fails); only a crash between those two renames leaves the old contents there
    instead of at ``path``. Whatever fails, the staging folder is removed.
    """
    path = os.path.abspath(path)
    check_replaceable(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.path.basename(path)}.", dir=parent)
    try:
        yield staging
        _give_the_umask_modes(staging)
        check_replaceable(path)  # something else may have written there meanwhile
        if not os.path.isdir(path):
            os.replace(staging, path)
            return
        retired = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.path.basename(path)}.old.", dir=parent)
        previous = os.path.join(retired, "previous")
        os.replace(path, previous)
        try:
            os.replace(staging, path)
        except BaseException:
            os.replace(previous, path)  # if even this fails, the old contents stay in ``retired``
            os.rmdir(retired)
            raise
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
