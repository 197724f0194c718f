"""Output folders: written whole or not at all, and never over a user's other files."""
import os
import stat

import paddle
import pytest

from paddlemix_vl2.models.deepseek_vl2.checkpoint import save_weights
from paddlemix_vl2.output_folders import atomic_directory


def _write(path, text="x"):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def test_a_folder_of_checkpoint_files_is_replaced_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    _write(target / "config.json", "old")
    _write(target / "model.safetensors", "old")
    with atomic_directory(str(target)) as staging:
        _write(os.path.join(staging, "config.json"), "new")
    assert sorted(os.listdir(target)) == ["config.json"]
    assert (target / "config.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or retired folder left


@pytest.mark.parametrize("foreign", ["notes.txt", "README.md", "sub"])
def test_a_folder_with_other_files_is_refused_and_left_as_it_was(tmp_path, foreign):
    target = tmp_path / "out"
    target.mkdir()
    _write(target / "config.json", "mine")
    if foreign == "sub":
        (target / foreign).mkdir()
    else:
        _write(target / foreign, "the user's")
    sibling = tmp_path / "out.old"  # an unrelated folder beside it
    sibling.mkdir()
    _write(sibling / "keep.txt")
    with pytest.raises(FileExistsError, match=f"holds 1 entry that a checkpoint does not \\({foreign}\\)"):
        with atomic_directory(str(target)):
            raise AssertionError("the block must not run")
    assert sorted(os.listdir(target)) == sorted(["config.json", foreign])
    assert sorted(os.listdir(tmp_path)) == ["out", "out.old"] and os.listdir(sibling) == ["keep.txt"]


def test_a_file_in_the_way_is_refused(tmp_path):
    target = tmp_path / "out"
    _write(target, "a file")
    with pytest.raises(FileExistsError, match="exists and is not a folder; choose a new output folder"):
        with atomic_directory(str(target)):
            pass
    assert target.read_text() == "a file"


def test_save_weights_refuses_a_folder_of_other_files(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    _write(target / "notes.txt", "the user's")
    with pytest.raises(FileExistsError, match="writing there would delete them"):
        save_weights(paddle.nn.Linear(2, 3), str(target))
    assert os.listdir(target) == ["notes.txt"] and os.listdir(tmp_path) == ["merged"]
    save_weights(paddle.nn.Linear(2, 3), str(tmp_path / "fresh"))
    assert sorted(os.listdir(tmp_path / "fresh")) == ["model.safetensors"]


def test_files_get_the_mode_the_umask_gives_a_new_file(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_directory(str(tmp_path / "out")) as staging:
            private = os.path.join(staging, "model.safetensors")
            os.close(os.open(private, os.O_WRONLY | os.O_CREAT, 0o600))  # as safetensors writes it
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "model.safetensors").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o750
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]  # the probe is gone


def test_a_failure_inside_or_at_the_end_keeps_the_old_folder_and_leaves_no_staging(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    _write(target / "config.json", "old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(str(target)) as staging:
            _write(os.path.join(staging, "config.json"), "new")
            raise RuntimeError("failed half-way")
    with pytest.raises(FileExistsError, match="notes.txt"):
        with atomic_directory(str(target)) as staging:
            _write(os.path.join(staging, "config.json"), "new")
            _write(target / "notes.txt", "written meanwhile by someone else")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / "config.json").read_text() == "old"
