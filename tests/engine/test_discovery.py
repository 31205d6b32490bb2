import os
import types

import pytest

from engine.discovery import iter_images
from engine.errors import InputError


def _touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b/2.png", "b/1.JPG", "a.webp", "c/d/e.bmp", "notes.txt", "c/x.gif", "z.jpeg"]:
        _touch(tmp_path / rel)
    found = [p.relative_to(tmp_path).as_posix() for p in iter_images(tmp_path)]
    assert found == ["a.webp", "b/1.JPG", "b/2.png", "c/d/e.bmp", "c/x.gif", "z.jpeg"]


def test_is_lazy(tmp_path):
    _touch(tmp_path / "a.png")
    it = iter_images(tmp_path)
    assert isinstance(it, types.GeneratorType)


def test_symlink_loop_is_skipped(tmp_path):
    _touch(tmp_path / "d/a.png")
    os.symlink(tmp_path, tmp_path / "d/loop")
    found = [p.name for p in iter_images(tmp_path)]
    assert found == ["a.png"]


def test_folder_named_like_an_image_is_walked(tmp_path):
    _touch(tmp_path / "dir.png/inner.png")
    assert [p.name for p in iter_images(tmp_path)] == ["inner.png"]


def test_single_file_and_missing_input(tmp_path):
    _touch(tmp_path / "one.png")
    assert list(iter_images(tmp_path / "one.png")) == [tmp_path / "one.png"]
    with pytest.raises(InputError, match="not found"):
        iter_images(tmp_path / "missing")  # raised eagerly, before iteration


def test_broken_symlink_is_yielded_for_an_error_row(tmp_path):
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    assert [p.name for p in iter_images(tmp_path)] == ["link.png"]


def test_a_loop_back_to_a_folder_below_the_root_is_skipped(tmp_path):
    # every folder on the way down counts as visited, not only the root
    _touch(tmp_path / "a/b/x.png")
    os.symlink(tmp_path / "a", tmp_path / "a/b/up")
    assert [p.relative_to(tmp_path).as_posix() for p in iter_images(tmp_path)] == ["a/b/x.png"]


def test_a_link_to_the_root_is_recognised_by_its_target(tmp_path):
    # the link is identified by the folder it points to, not by its own inode
    _touch(tmp_path / "a.png")
    os.symlink(tmp_path, tmp_path / "self")
    assert [p.relative_to(tmp_path).as_posix() for p in iter_images(tmp_path)] == ["a.png"]


def test_folder_links_are_walked_unless_told_not_to(tmp_path):
    _touch(tmp_path / "real/a.png")
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert [p.relative_to(tmp_path).as_posix() for p in iter_images(tmp_path)] == ["link/a.png", "real/a.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in iter_images(tmp_path, follow_symlinks=False)] == ["real/a.png"]


def test_every_supported_image_suffix_in_any_case():
    from engine.discovery import is_image_name

    names = ["a.png", "a.jpg", "a.JPEG", "a.jpe", "a.jfif", "a.webp", "a.bmp", "a.gif", "a.tif", "a.TIFF"]
    assert [n for n in names if not is_image_name(n)] == []
    assert not any(is_image_name(n) for n in ("a.txt", "png", "a.png.part", "a.svg"))


def test_an_input_that_is_neither_a_folder_nor_a_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="neither a folder nor a file"):
        iter_images(fifo)
