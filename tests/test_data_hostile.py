"""Hostile or unlucky data trees: link loops, FIFOs, bomb headers, non-UTF-8 names, files changed after caching."""

from __future__ import annotations

import io
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from train_helpers import run_with_timeout

from jit_fast.data import build_index, build_loader
from jit_fast.data.index import header_problem, max_pixels


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small random RGB JPEG."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF0 header patched to claim width x height (the entropy data stays tiny)."""
    at = data.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height and width
    return data[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 4 :]


def make_tree(root: Path, layout: dict[str, int]) -> None:
    """Class folders with numbered small JPEGs: {"a": 3} -> a/0.jpg a/1.jpg a/2.jpg."""
    for c, n in layout.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"{i}.jpg").write_bytes(jpeg_bytes(zlib.crc32(f"{c}/{i}".encode())))


def indexed(root: Path, **kw) -> tuple:
    """build_index with warnings recorded: (index, text of all warnings, number of warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = build_index(root, **kw)
    return index, " ".join(str(w.message) for w in caught), len(caught)


def test_directory_links_that_loop_or_leave_the_class_are_not_followed(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    root, ext = tmp_path / "data", tmp_path / "elsewhere"
    make_tree(root, {"a": 3, "b": 2, "a/sub": 1})
    make_tree(ext, {"more": 1})
    bad_links = {"a/loop": "..", "a/sub/up": "..", "a/alias": "sub", "a/other": "../b"}
    for link, target in bad_links.items():
        os.symlink(target, root / link)
    os.symlink(ext / "more", root / "a" / "ext")  # a folder outside the dataset: a symlink farm, followed
    os.symlink("../b/0.jpg", root / "a" / "link.jpg")  # file links are followed (label of the folder holding them)
    index, text, count = indexed(root, cache=False)
    rel = [os.path.relpath(p, root) for p in index.paths]
    assert rel == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "a/link.jpg", "a/ext/0.jpg", "a/sub/0.jpg", "b/0.jpg", "b/1.jpg"]
    assert index.labels == [0] * 6 + [1] * 2
    assert sorted(os.path.relpath(p, root) for p, _ in index.bad) == sorted(bad_links)
    assert count == 1 and all(f"{root}/{link}" in text for link in bad_links) and "loop" in text
    for link in bad_links:
        os.remove(root / link)
    tv = ImageFolder(str(root))  # the same tree without the bad links: torchvision's order and labels
    assert list(zip(index.paths, index.labels, strict=True)) == tv.samples


def test_fifo_and_broken_links_are_skipped_without_opening(tmp_path: Path) -> None:
    from jit_fast.data.prepare import prepare

    root = tmp_path / "data"
    make_tree(root, {"a": 2, "b": 2})
    fifo = root / "a" / "pipe.jpg"
    os.mkfifo(fifo)
    os.symlink("missing.jpg", root / "b" / "dangling.jpg")
    os.symlink("self.jpg", root / "b" / "self.jpg")
    index, text, _ = run_with_timeout(lambda: indexed(root, cache=False), 60, fifo)
    assert {Path(p).name: why for p, why in index.bad} == {
        "pipe.jpg": "not a regular file (FIFO): never opened",
        "dangling.jpg": "cannot stat: No such file or directory",
        "self.jpg": "cannot stat: Too many levels of symbolic links",
    }
    assert str(fifo) in text and len(index) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = build_loader(root, img_size=16, batch_size=2, backend="torch", index_cache=False, num_workers=0)
        assert len(run_with_timeout(lambda: list(loader), 60, fifo)) == 2
        failures = run_with_timeout(lambda: prepare(root, tmp_path / "out", size=16), 60, fifo)
    assert any(str(fifo) in f and "FIFO" in f for f in failures) and not (tmp_path / "out" / "a" / "pipe.png").exists()


def test_bomb_header_is_skipped_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JIT_FAST_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    make_tree(root, {"a": 2, "b": 2})
    bomb = root / "b" / "bomb.jpg"
    bomb.write_bytes(claim_size(jpeg_bytes(0, (16, 16)), 12000, 12000))  # ~800 bytes claiming 144 Mpx
    assert bomb.stat().st_size < 1000
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.filename) or real_load(im))
    index, text, _ = indexed(root, img_size=256)
    assert len(set(decoded)) == 4 and str(bomb) not in decoded  # refused from the header, never decoded
    monkeypatch.undo()
    monkeypatch.setenv("JIT_FAST_CACHE", str(tmp_path / "cache"))
    why = "header claims 12000x12000 = 144 Mpx, over the 67 Mpx limit (decompression bomb?)"
    assert index.bad == [(str(bomb), why)]
    assert str(bomb) in text and len(index) == 4
    assert max_pixels(256) == max_pixels(512) == 1 << 26 and max_pixels(2048) == 64 * 2048**2
    # the limit follows the target: at 2048 (268 Mpx) the cached header verdict is revisited and the file decoded
    big, _, _ = indexed(root, img_size=2048)
    assert not big.bad and big.sizes[big.paths.index(str(bomb))] == (12000, 12000)
    camera = tmp_path / "camera.jpg"  # a 48 Mpx camera frame is not a bomb at any target size
    camera.write_bytes(claim_size(jpeg_bytes(1), 8000, 6000))
    with Image.open(camera) as img:
        assert img.size == (8000, 6000) and header_problem(img, max_pixels(256)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = build_loader(root, img_size=32, batch_size=4, backend="dali", num_workers=1)
    assert str(bomb) not in loader.index.paths and len(list(loader)) == 1


def test_non_utf8_names_are_named_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JIT_FAST_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    make_tree(root, {"a": 2, "b": 2})
    broot = os.fsencode(root)
    try:
        Path(os.fsdecode(os.path.join(broot, b"a", b"caf\xe9.jpg"))).write_bytes(jpeg_bytes(5))
        os.mkdir(os.path.join(broot, b"b", b"\xff"))
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    Path(os.fsdecode(os.path.join(broot, b"b", b"\xff", b"x.jpg"))).write_bytes(jpeg_bytes(6))
    index, text, count = indexed(root)
    assert len(index) == 4 and count == 1
    assert repr(os.path.join(broot, b"a", b"caf\xe9.jpg")) in text and repr(os.path.join(broot, b"b", b"\xff")) in text
    assert all(why == "name is not valid UTF-8" for _, why in index.bad) and len(index.bad) == 2
    assert repr(os.path.join(broot, b"a", b"caf\xe9.jpg")) in index.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in ("torch", "dali"):
            loader = build_loader(root, img_size=16, batch_size=2, backend=backend, num_workers=1, cache=False)
            assert len(list(loader)) == 2
    os.mkdir(os.path.join(broot, b"\xfe"))
    with pytest.raises(ValueError, match=r"class folder name is not valid UTF-8: .*\\xfe"):
        build_index(root, cache=False)


def test_file_changed_after_caching_is_validated_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JIT_FAST_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    make_tree(root, {"a": 4, "b": 4})
    first, _, _ = indexed(root, img_size=32)
    assert len(first) == 8 and not first.bad and list((tmp_path / "cache" / "index").glob("*.tsv"))
    same_size, sneaky = root / "a" / "1.jpg", root / "b" / "2.jpg"
    for path in (same_size, sneaky):
        data = bytearray(path.read_bytes())
        old = path.stat()
        data[20:300] = bytes(280)  # corrupted in place: same size
        path.write_bytes(bytes(data))
        assert path.stat().st_size == old.st_size
    os.utime(sneaky, ns=(old.st_atime_ns, old.st_mtime_ns))  # even the mtime is put back: the ctime still moves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = build_loader(root, img_size=32, batch_size=3, backend="torch", shuffle=False, flip=False)
        batches = list(loader)  # the RAM cache decodes every indexed file: a stale index would stop here
    assert sorted(p for p, _ in loader.index.bad) == [str(same_size), str(sneaky)]
    assert str(same_size) in " ".join(str(w.message) for w in caught) and len(batches) == 2


def test_file_broken_after_indexing_gets_the_next_file_in_ram_cache(tmp_path: Path) -> None:
    from jit_fast.data.crop import center_crop
    from jit_fast.data.torch_backend import TorchBackend

    root = tmp_path / "data"
    make_tree(root, {"a": 3, "b": 3})
    index = build_index(root, cache=False)
    Path(index.paths[2]).write_bytes(b"broken")
    with pytest.warns(UserWarning, match=r"2\.jpg.*the next file stands in"):
        backend = TorchBackend(index, 16, num_workers=0, cache=True)
    assert backend.images is not None
    np.testing.assert_array_equal(backend.images[2], center_crop(index.paths[3], 16).transpose(2, 0, 1))
    assert backend.labels.tolist() == [0, 0, 1, 1, 1, 1]  # the stand-in's label goes with its image


def test_many_bad_files_give_one_short_warning_and_the_same_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JIT_FAST_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    make_tree(root, {"a": 3, "b": 3})
    for i in range(30):
        (root / "b" / f"bad{i:02d}.jpg").write_bytes(b"not an image")
    fresh, text, count = indexed(root, cache=False)
    assert count == 1 and "skipping 30 files" in text and text.endswith("; and 20 more")
    assert sum(f"bad{i:02d}.jpg" in text for i in range(30)) == 10
    assert fresh.summary().endswith("; and 10 more") and len(fresh.bad) == 30
    indexed(root)  # writes the cache; ranks reading it must see the same index as a rank validating afresh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranks = [build_loader(root, img_size=16, batch_size=2, rank=r, world_size=2, backend="torch") for r in (0, 1)]
    for ld in ranks:
        assert (ld.index.paths, ld.index.labels, ld.index.bad) == (fresh.paths, fresh.labels, fresh.bad)


def test_prepare_refuses_deep_pixels_like_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jit_fast.data.prepare import main

    src = tmp_path / "src"
    make_tree(src, {"a": 2})
    deep = src / "a" / "deep.png"
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(deep)
    assert Image.open(deep).mode == "I;16"
    index, _, _ = indexed(src, cache=False)
    assert [Path(p).name for p, _ in index.bad] == ["deep.png"]
    assert main([str(src), str(tmp_path / "dst"), "--size", "32", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {deep}: {index.bad[0][1]}" in err  # the same rule and message as the training index
    assert not (tmp_path / "dst" / "a" / "deep.png").exists() and (tmp_path / "dst" / "a" / "0.png").exists()


def test_prepare_names_both_inputs_of_an_output_clash(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jit_fast.data.prepare import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src, {"a": 1, "b": 1})
    Image.open(src / "a" / "0.jpg").save(src / "a" / "one.png")
    (src / "a" / "one.jpg").write_bytes(jpeg_bytes(9))
    assert main([str(src), str(dst), "--size", "16", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("prepare: error: ")
    assert str(src / "a" / "one.jpg") in err and str(src / "a" / "one.png") in err and str(dst / "a" / "one.png") in err
    assert not dst.exists()  # refused before anything is written
    assert main([str(tmp_path / "nowhere"), str(dst)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
