"""Hostile captions and text-embedding caches (issue 26 item 8): empty, huge, non-UTF-8 captions, captions that
do not match the images, a cache of another encoder or tokenizer, truncated or tampered cache files, and kill -9
while the cache is written. Each is one line naming the file (exit 2 for the CLI) or is left out with a warning;
no run ever uses a partial or foreign cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import REPO, describe, subprocess_env

import jit_fast.data.encode_text as encode_text
from jit_fast.data.encode_text import encode_captions
from jit_fast.text.cache import CacheError, TextCache
from jit_fast.text.encoder import TextEncoder
from jit_fast.text.tiny import build_tiny_encoder

CAPTIONS = ["a handwritten one", "the digit 2 , two", "a drawing of three", "four", "the number five", "a six"]
pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(root: Path, captions=CAPTIONS, images: int | None = None) -> Path:
    """images/NN.png + captions/NN.txt; `captions` items may be bytes (written raw)."""
    (root / "images").mkdir(parents=True)
    (root / "captions").mkdir()
    for i in range(len(captions) if images is None else images):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "images" / f"{i:02d}.png")
    for i, text in enumerate(captions):
        path = root / "captions" / f"{i:02d}.txt"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def make_jsonl(root: Path, lines: list[bytes], images: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(images):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "images" / f"{i:02d}.png")
    (root / "captions.jsonl").write_bytes(b"".join(lines))
    return root


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny", CAPTIONS + ["seven", "eight"])


@pytest.fixture(scope="module")
def encoder(encoder_dir) -> TextEncoder:
    return TextEncoder.load(encoder_dir, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def build(data, encoder, out, **kw) -> Path:
    return encode_captions(data, encoder, out, shard_rows=4, batch_size=2, progress=False, **kw)


def cli(data, encoder_dir, out, capsys, *extra: str) -> tuple[int, list[str]]:
    """encode_text's main in this process: (exit status, its stderr lines; warnings are silenced)."""
    capsys.readouterr()  # what the test printed before (loading an encoder itself) is not the CLI's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = encode_text.main([str(data), "--encoder", str(encoder_dir), "--out", str(out), "--no-progress",
                                 "--device", "cpu", "--shard-rows", "4", "--batch-size", "2", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def test_empty_captions_are_left_out_and_an_all_empty_dataset_is_one_line(encoder, encoder_dir, tmp_path, capsys):
    data = make_data(tmp_path / "d", ["a six", "", "  \n\t ", "four"])
    with pytest.warns(UserWarning, match=r"not encoding 2 unpaired.*01\.txt \(empty caption\).*02\.txt"):
        cache = TextCache(build(data, encoder, tmp_path / "c"))
    assert cache.keys == ["00", "03"]
    code, err = cli(make_data(tmp_path / "e", ["", " "]), encoder_dir, tmp_path / "c2", capsys)
    assert code == 2 and err[-1] == f"encode_text: error: no captioned images under {tmp_path / 'e'}"
    code, err = cli(make_jsonl(tmp_path / "j", []), encoder_dir, tmp_path / "c3", capsys)
    assert code == 2 and err[-1] == f"encode_text: error: no captioned images under {tmp_path / 'j'}"
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c3").exists()


def test_huge_captions_are_refused_or_truncated_without_reading_them_whole(encoder, encoder_dir, tmp_path, capsys):
    huge = ("seven " * 180_000).encode()  # about 1 MB on one line
    data = make_data(tmp_path / "d", ["a six", huge, "four " * 10_000])  # the last: 50 KB, under the 64 KiB limit
    with pytest.warns(UserWarning, match=r"01\.txt \(caption file over 65536 bytes\)"):
        cache = TextCache(build(data, encoder, tmp_path / "c"))
    assert cache.keys == ["00", "02"]
    assert encoder.tokenize(["four " * 10_000])["input_ids"].shape == (1, 77)  # truncated to --max-text-len
    line = json.dumps({"file": "01.png", "caption": huge.decode()}).encode() + b"\n"
    code, err = cli(make_jsonl(tmp_path / "j", [b'{"file": "00.png", "caption": "a six"}\n', line]), encoder_dir,
                    tmp_path / "c2", capsys)
    assert code == 2 and err[-1] == (f"encode_text: error: {tmp_path / 'j' / 'captions.jsonl'}:2: line longer than "
                                     "65536 bytes")


def test_non_utf8_captions_are_named(encoder, encoder_dir, tmp_path, capsys):
    data = make_data(tmp_path / "d", ["a six", b"a \xff\xfe seven", "four"])
    with pytest.warns(UserWarning, match=r"01\.txt \(caption is not valid UTF-8\)"):
        assert TextCache(build(data, encoder, tmp_path / "c")).keys == ["00", "02"]
    jsonl = make_jsonl(tmp_path / "j", [b'{"file": "00.png", "caption": "a six"}\n',
                                        b'{"file": "01.png", "caption": "a \xff seven"}\n'])
    code, err = cli(jsonl, encoder_dir, tmp_path / "c2", capsys)
    assert code == 2 and err[-1].startswith(f"encode_text: error: {jsonl / 'captions.jsonl'}:2: not a JSON line (")


def test_captions_that_do_not_match_the_images(encoder, tmp_path):
    """More captions than images, more images than captions: the pairs are kept, the rest named; a dataset grown
    after its cache was made is refused by the cache in one line."""
    data = make_data(tmp_path / "d", ["a six", "four", "seven"], images=2)  # 02.txt has no image
    with pytest.warns(UserWarning, match=r"not encoding 1 unpaired.*02\.txt \(caption without an image\)"):
        cache = TextCache(build(data, encoder, tmp_path / "c"))
    assert cache.keys == ["00", "01"]
    grown = make_data(tmp_path / "g", ["a six", "four"], images=4)
    with pytest.warns(UserWarning, match=r"not encoding 2 unpaired.*02\.png \(image without a caption\)"):
        build(grown, encoder, tmp_path / "c4")
    with pytest.raises(CacheError) as err:
        cache.rows(["00", "01", "02"], ["a six", "four", "seven"])
    one_line(err, str(tmp_path / "c" / "index.json"), "1 keys of the dataset are not cached", "'02'")


def test_cache_of_another_encoder_tokenizer_or_length_is_refused(data, encoder, encoder_dir, tmp_path, capsys):
    out = build(data, encoder, tmp_path / "c")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    index = str(out / "index.json")
    other_tok = tmp_path / "other_tok"  # same model weights and path layout, another tokenizer vocabulary
    shutil.copytree(encoder_dir, other_tok)
    vocab = json.loads((other_tok / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["seven"], vocab["model"]["vocab"]["eight"] = (vocab["model"]["vocab"]["eight"],
                                                                         vocab["model"]["vocab"]["seven"])
    (other_tok / "tokenizer.json").write_text(json.dumps(vocab))
    swapped = TextEncoder.load(other_tok, device="cpu")
    assert swapped.spec.revision != encoder.spec.revision
    cache = TextCache(out)
    for kw, needle in ((dict(encoder=str(other_tok), revision=swapped.spec.revision), "encoder revision 'sha256:"),
                       (dict(max_length=16), "max text length 77 (wanted 16)"), (dict(dim=64), "embedding width 32")):
        with pytest.raises(CacheError) as err:
            cache.require(**kw)
        one_line(err, index, needle)
    for enc, extra in ((other_tok, ()), (encoder_dir, ("--max-text-len", "16")),
                       (encoder_dir, ("--pooling", "sequence"))):
        code, err = cli(data, enc, out, capsys, *extra)
        assert code == 2 and len(err) == 1 and err[0].startswith(f"encode_text: error: text cache {index} was made "
                                                                 "with other settings"), err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # refused, never overwritten


def test_the_same_encoder_folder_with_another_tokenizer_is_refused_by_the_cache(data, encoder, encoder_dir, tmp_path):
    """A run naming a local encoder folder (no revision) whose files changed since the cache was made: refused."""
    local = tmp_path / "enc"
    shutil.copytree(encoder_dir, local)
    out = build(data, TextEncoder.load(local, device="cpu"), tmp_path / "c")
    TextCache(out).require(encoder=str(local))
    cfg = json.loads((local / "tokenizer_config.json").read_text())
    (local / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": False}))
    with pytest.raises(CacheError) as err:
        TextCache(out).require(encoder=str(local))
    one_line(err, str(out / "index.json"), "encoder revision", "files changed since the cache was made")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name", ["index.json", "pooled-00001.npy", "tokens-00000.npy", "lengths-00001.npy",
                                  "empty-pooled.npy", "empty-tokens.npy"])
def test_truncated_cache_file_is_named(data, encoder, tmp_path, name):
    out = build(data, encoder, tmp_path / "c", pooling="sequence", seq_len=4)
    truncate(out / name)
    with pytest.raises(CacheError) as err:
        cache = TextCache(out)
        cache.empty()
    one_line(err, str(out / name))


def test_truncated_file_of_an_interrupted_cache_is_named_on_resume(data, encoder, encoder_dir, tmp_path, capsys):
    out = build(data, encoder, tmp_path / "c")
    meta = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**meta, "complete": False}))
    truncate(out / "done-00001.npy")
    code, err = cli(data, encoder_dir, out, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(
        f"encode_text: error: text cache {out / 'done-00001.npy'}: not a readable .npy file"), err


def tamper_index(out: Path, **fields) -> None:
    meta = json.loads((out / "index.json").read_text())
    meta.update(fields)
    for k in [k for k, v in fields.items() if v is None]:
        del meta[k]
    (out / "index.json").write_text(json.dumps(meta))


def put(out: Path, name: str, edit) -> None:
    arr = np.load(out / name, mmap_mode="r+")
    edit(arr)
    arr.flush()


@pytest.mark.parametrize("case,needle", [
    ("count missing", "index.json: count must be the number of keys"),
    ("count wrong", "index.json: count must be the number of keys"),
    ("key not a string", "index.json: keys must be a non-empty list of strings"),
    ("bad digest", "index.json: one caption digest per key needed"),
    ("lengths too long", "lengths-00000.npy: token counts outside [0, 4]"),
    ("lengths dtype", "lengths-00000.npy: holds int64 (4,), expected int32"),
    ("tokens fortran", "tokens-00001.npy: holds float16 (2, 4, 32), expected float16 (2, 4, 32) in C order"),
    ("tokens inf", "tokens-00001.npy: non-finite embedding for key '05'"),
    ("empty nan", "empty-pooled.npy: non-finite values"),
])
def test_tampered_cache_is_named(data, encoder, tmp_path, case, needle):
    out = build(data, encoder, tmp_path / "c", pooling="sequence", seq_len=4)
    edits = {
        "count missing": lambda: tamper_index(out, count=None),
        "count wrong": lambda: tamper_index(out, count=99),
        "key not a string": lambda: tamper_index(out, keys=[0, "01", "02", "03", "04", "05"]),
        "bad digest": lambda: tamper_index(out, captions=["x" * 16] * 6),
        "lengths too long": lambda: put(out, "lengths-00000.npy", lambda a: a.__setitem__(1, 9)),
        "lengths dtype": lambda: np.save(out / "lengths-00000.npy", np.ones(4, np.int64)),
        "tokens fortran": lambda: np.save(out / "tokens-00001.npy",
                                          np.asfortranarray(np.zeros((2, 4, 32), np.float16))),
        "tokens inf": lambda: put(out, "tokens-00001.npy", lambda a: a.__setitem__((1, 0, 3), np.inf)),
        "empty nan": lambda: put(out, "empty-pooled.npy", lambda a: a.__setitem__(0, np.nan)),
    }
    edits[case]()
    with pytest.raises(CacheError) as err:
        cache = TextCache(out)
        cache.empty()
        cache.condition(np.arange(len(cache)))
    one_line(err, str(out), needle)


def run_cli(*args: str, killer: str | None = None) -> subprocess.CompletedProcess:
    """The real encode_text process (or the killer driver around it)."""
    cmd = [sys.executable, str(REPO / "tests" / "text_cache_killer.py"), killer] if killer else \
        [sys.executable, "-m", "jit_fast.data.encode_text"]
    return subprocess.run(cmd + list(args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def test_kill_9_while_writing_rows_then_the_next_run_resumes(data, encoder, encoder_dir, tmp_path):
    """SIGKILL between a batch's embeddings and its done marks: training refuses the cache in one line, the next
    encode_text run re-encodes the unmarked rows and the files equal an uninterrupted run's."""
    fresh = build(data, encoder, tmp_path / "fresh")
    out = tmp_path / "c"
    args = (str(data), "--encoder", str(encoder_dir), "--out", str(out), "--device", "cpu", "--no-progress",
            "--shard-rows", "4", "--batch-size", "2")
    p = run_cli(*args, killer="rows")
    assert p.returncode == -9, describe(p)
    assert json.loads((out / "index.json").read_text())["complete"] is False
    with pytest.raises(CacheError) as err:
        TextCache(out)
    one_line(err, str(out / "index.json"), "incomplete: run python -m jit_fast.data.encode_text again")
    p = run_cli(*args)
    assert p.returncode == 0 and p.stderr.strip().splitlines()[-1] == f"done: {out}", describe(p)
    for f in sorted(fresh.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in fresh.iterdir())


def test_kill_9_before_the_index_exists_then_the_next_run_refuses_in_one_line(data, encoder_dir, tmp_path):
    """SIGKILL while the shard files of a new cache are created: no index.json, so nothing there is a cache. The
    next run names the folder and the cause, writes nothing into it and deletes nothing."""
    out = tmp_path / "c"
    args = (str(data), "--encoder", str(encoder_dir), "--out", str(out), "--device", "cpu", "--no-progress",
            "--shard-rows", "4", "--batch-size", "2")
    p = run_cli(*args, killer="prepare")
    assert p.returncode == -9, describe(p)
    left = {f.name: f.read_bytes() for f in out.iterdir()}
    assert "index.json" not in left and "pooled-00000.npy" in left
    p = run_cli(*args)
    assert p.returncode == 2, describe(p)
    assert p.stderr.strip().splitlines() == [
        f"encode_text: error: --out {out} holds text-cache files but no index.json (an encode_text run was stopped "
        "before it wrote one, or the index was removed): nothing there is used or overwritten; remove the folder or "
        "choose another --out"]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == left
    with pytest.raises(CacheError) as err:
        TextCache(out)
    one_line(err, str(out / "index.json"), "no such file")
