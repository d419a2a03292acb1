"""Captioned folders (issue 14): exact image-caption pairing, what is left out and reported, both loaders.

Each test image is a noisy field whose mean color encodes its number, and its caption names the number,
so a batch row can be checked against its own file and caption.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jit_fast.data import CaptionError, build_caption_index, build_loader, center_crop

N = 14


def write_image(path: Path, i: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(i)
    arr = np.clip(np.full((size[1], size[0], 3), 10 + 17 * i) + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def write_caption(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """N paired images (jpg and png, one in a sub-folder) plus every kind of unpaired entry."""
    root = tmp_path_factory.mktemp("captioned")
    for i in range(N):
        rel = f"sub/{i:03d}" if i == 5 else f"{i:03d}"
        write_image(root / "images" / f"{rel}.{'png' if i % 4 == 0 else 'jpg'}", i, (40 + 3 * i, 36 + 2 * i))
        write_caption(root / "captions" / f"{rel}.txt", f"  picture\nnumber {i}  ")
    write_image(root / "images" / "lonely.jpg", 90, (40, 40))  # no caption
    write_caption(root / "captions" / "ghost.txt", "a caption without an image")
    write_image(root / "images" / "twin.jpg", 91, (40, 40))  # two images for one key
    write_image(root / "images" / "twin.png", 92, (40, 40))
    write_caption(root / "captions" / "twin.txt", "which twin?")
    write_image(root / "images" / "blank.jpg", 93, (40, 40))
    write_caption(root / "captions" / "blank.txt", " \n ")
    write_image(root / "images" / "latin1.jpg", 94, (40, 40))
    write_caption(root / "captions" / "latin1.txt", "caf\xe9".encode("latin-1"))
    (root / "images" / "notes.md").write_text("ignored: not an image")
    return root


def number_of(caption: str) -> int:
    return int(caption.split()[-1])


def test_folder_pairs_exactly_and_reports_the_rest(folder):
    with pytest.warns(UserWarning) as rec:
        index = build_caption_index(folder, cache=False)
    assert index.keys == sorted(f"sub/{i:03d}" if i == 5 else f"{i:03d}" for i in range(N))
    for path, key, cap, label in zip(index.paths, index.keys, index.captions, index.labels, strict=True):
        assert Path(path).with_suffix("").as_posix().endswith(f"images/{key}")
        assert cap == f"picture number {number_of(cap)}" and key.endswith(f"{number_of(cap):03d}")
        assert index.keys[label] == key
    text = " ".join(str(w.message) for w in rec)
    for name in ("lonely.jpg", "ghost.txt", "twin.jpg", "twin.png", "blank.txt", "latin1.txt"):
        assert name in text
    assert "image without a caption" in text and "caption without an image" in text
    assert "2 images share the key 'twin'" in text and "empty caption" in text and "not valid UTF-8" in text
    assert "notes.md" not in text
    unpaired = {Path(p).name for p, _ in index.unpaired}
    assert unpaired == {"lonely.jpg", "ghost.txt", "twin.jpg", "twin.png", "blank.txt", "latin1.txt"}  # with why
    assert f"{N} captioned images" in index.summary()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loader_rows_carry_their_own_caption(folder, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = build_loader(folder, img_size=32, batch_size=4, backend=backend, captions=True, output="uint8",
                              flip=False, index_cache=False, num_workers=1)
    index = loader.index
    seen = []
    for x, y in loader:
        for row, i in zip(x, y.tolist(), strict=True):
            want = torch.from_numpy(center_crop(index.paths[i], 32)).permute(2, 0, 1)
            if backend == "torch":
                assert torch.equal(row, want)
            else:
                assert (row.float() - want.float()).abs().mean() < 2
            assert abs(row.float().mean().item() - (10 + 17 * number_of(index.captions[i]))) < 4
            seen.append(i)
    assert len(seen) == len(set(seen)) == N - N % 4


def test_loader_shards_and_resumes_over_captions(folder):
    kw = dict(img_size=16, batch_size=2, backend="torch", captions=True, index_cache=False, num_workers=0, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranks = [build_loader(folder, rank=r, world_size=2, **kw) for r in range(2)]
        full = build_loader(folder, **kw)
        part = build_loader(folder, **kw)
    per_rank = [torch.cat([y for _, y in ld]).tolist() for ld in ranks]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(per_rank[0]) == len(per_rank[1]) == 6
    want = [y for _, y in full]
    for step, _ in enumerate(part):
        if step == 1:  # two batches handed out
            break
    state = part.state_dict()
    assert state["batch"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = build_loader(folder, **kw)
    resumed.load_state_dict(state)
    assert [y.tolist() for _, y in resumed] == [y.tolist() for y in want[2:]]


def make_jsonl_root(root: Path, lines: list[str]) -> Path:
    for i in range(4):
        write_image(root / "images" / f"{i}.jpg", i, (30, 30))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_jsonl_pairs_by_file_name(tmp_path):
    lines = [json.dumps({"file": f"{i}.jpg", "caption": f"number {i}"}) for i in (0, 1)]
    lines += [json.dumps({"file": "2.png", "caption": "wrong extension"}),
              json.dumps({"file": "3.jpg", "caption": "first"}), json.dumps({"file": "./3.jpg", "caption": "second"}),
              json.dumps({"file": "../escape.jpg", "caption": "outside"}),
              json.dumps({"file": "images/9.jpg", "caption": "relative to DATA"}), ""]
    root = make_jsonl_root(tmp_path, lines)
    with pytest.warns(UserWarning) as rec:
        index = build_caption_index(root, cache=False)
    assert index.keys == ["0", "1"] and index.captions == ["number 0", "number 1"]
    text = " ".join(str(w.message) for w in rec)
    assert "'2.png' (paths are relative to images/)" in text and "2.jpg (image without a caption)" in text
    assert "2 captions" in text and "captions.jsonl:4" in text and "captions.jsonl:5" in text
    assert "not a path inside images/" in text and "'images/9.jpg'" in text


@pytest.mark.parametrize(("line", "needle"), [
    ("{not json", "captions.jsonl:2: not a JSON line"),
    ('{"file": "1.jpg"}', "captions.jsonl:2: expected"),
    ('["1.jpg", "x"]', "captions.jsonl:2: expected"),
])
def test_malformed_jsonl_names_the_line(tmp_path, line, needle):
    root = make_jsonl_root(tmp_path, [json.dumps({"file": "0.jpg", "caption": "zero"}), line])
    with pytest.raises(CaptionError, match=needle):
        build_caption_index(root, cache=False)


def test_layout_errors(tmp_path):
    with pytest.raises(CaptionError, match="no images/ folder"):
        build_caption_index(tmp_path, cache=False)
    make_jsonl_root(tmp_path, [json.dumps({"file": "0.jpg", "caption": "zero"})])
    (tmp_path / "captions").mkdir()
    with pytest.raises(CaptionError, match="both captions/ and captions.jsonl"):
        build_caption_index(tmp_path, cache=False)
    (tmp_path / "captions.jsonl").unlink()
    with pytest.raises(CaptionError, match="no captioned images"), pytest.warns(UserWarning, match="4 files"):
        build_caption_index(tmp_path, cache=False)
