"""Captioned image folders for text-to-image training: images paired with captions by stem, never guessed.

Two layouts under DATA:
* `images/` + `captions/` (the public text-conditional fork's layout): `captions/<stem>.txt` holds the caption
  of `images/<stem>.<ext>`; sub-folders pair by relative path (`images/a/1.jpg` with `captions/a/1.txt`).
* `images/` + `captions.jsonl`: one JSON object per line, {"file": path relative to images/, "caption": text}.

An image's key is its path under images/ without the extension ("a/1"); it keys the embedding cache.
Images without a caption, captions without an image, two images or two captions for one key, unreadable,
empty or oversized captions are reported (count and first names) and left out: no image is ever trained
with another image's caption. Whitespace runs in a caption collapse to one space.
"""

from __future__ import annotations

import json
import os
import posixpath
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..shared.errors import UserError
from .index import IMG_EXTENSIONS, FolderIndex, FolderScan, listing, show_path, validate_scan, walk_folder

MAX_CAPTION_BYTES = 1 << 16  # a caption file or jsonl line longer than this is refused (64 KiB)
JSONL_NAME = "captions.jsonl"


class CaptionError(UserError, ValueError):
    """A captioned dataset that cannot be used, named with the file and the reason."""


class _Caption(NamedTuple):
    source: str  # caption file, or captions.jsonl:LINE
    text: str
    file: str | None = None  # jsonl: the image named by the line, relative to images/


@dataclass
class CaptionedIndex(FolderIndex):
    """A validated captioned dataset: paths[i] has key keys[i] and caption captions[i]; labels[i] == i.

    `unpaired` lists (name, why) of images and captions left out for want of a partner (or an ambiguous one).
    """

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    unpaired: list[tuple[str, str]] = field(default_factory=list)

    def summary(self, named: int = 20) -> str:
        """One-line count of captioned images, skipped files and unpaired names, naming the first of each."""
        text = f"{len(self.paths)} captioned images, {len(self.bad)} files skipped, {len(self.unpaired)} unpaired"
        if self.bad:
            text += ": skipped " + listing([f"{show_path(p)} ({why})" for p, why in self.bad], named)
        if self.unpaired:
            text += "; unpaired " + listing([f"{show_path(p)} ({why})" for p, why in self.unpaired], named)
        return text


def key_of(rel_path: str) -> str:
    """Cache key of a file path relative to images/ (or captions/): POSIX separators, extension dropped."""
    return posixpath.splitext(rel_path.replace(os.sep, "/"))[0]


def clean_caption(text: str) -> str:
    """The caption as encoded: whitespace runs collapsed to single spaces, ends stripped."""
    return " ".join(text.split())


def captioned_layout(root: str | Path) -> str:
    """"folders" (images/ + captions/) or "jsonl" (images/ + captions.jsonl); CaptionError for anything else."""
    root = Path(root)
    has_dir, has_jsonl = (root / "captions").is_dir(), (root / JSONL_NAME).is_file()
    if not (root / "images").is_dir():
        raise CaptionError(f"{root} has no images/ folder: a captioned dataset is images/ + captions/ or "
                           f"images/ + {JSONL_NAME}")
    if has_dir and has_jsonl:
        raise CaptionError(f"{root} has both captions/ and {JSONL_NAME}: keep one so the pairing is unambiguous")
    if not (has_dir or has_jsonl):
        raise CaptionError(f"{root} has images/ but neither captions/ nor {JSONL_NAME}")
    return "folders" if has_dir else "jsonl"


def _read_caption_file(path: str) -> tuple[str | None, str]:
    """(caption, "") or (None, why it cannot be used)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CAPTION_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
    if len(raw) > MAX_CAPTION_BYTES:
        return None, f"caption file over {MAX_CAPTION_BYTES} bytes"
    try:
        text = clean_caption(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return None, "caption is not valid UTF-8"
    return (text, "") if text else (None, "empty caption")


def _folder_captions(root: str, root_real: str, skipped: list[tuple[str, str]], refused: dict[str, list]
                     ) -> dict[str, list[_Caption]]:
    """key -> captions of captions/; unusable caption files go to refused (key -> [(path, why)])."""
    cap_dir = os.path.join(root, "captions")
    found: dict[str, list[_Caption]] = {}
    for dirpath, files in walk_folder(cap_dir, root_real, skipped, (".txt",)):
        for fname, _ in files:
            path = os.path.join(dirpath, fname)
            text, why = _read_caption_file(path)
            key = key_of(os.path.relpath(path, cap_dir))
            if text is None:
                refused.setdefault(key, []).append((path, why))
                continue
            found.setdefault(key, []).append(_Caption(path, text))
    return found


def _jsonl_captions(root: str, skipped: list[tuple[str, str]]) -> dict[str, list[_Caption]]:
    """key -> captions of captions.jsonl; a line that is not a {"file", "caption"} object is an error."""
    path = os.path.join(root, JSONL_NAME)
    found: dict[str, list[_Caption]] = {}
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CaptionError(f"cannot read {path}: {exc.strerror}") from exc
    with f:
        lineno = 0
        while line := f.readline(MAX_CAPTION_BYTES + 1):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(line) > MAX_CAPTION_BYTES and not line.endswith(b"\n"):
                raise CaptionError(f"{where}: line longer than {MAX_CAPTION_BYTES} bytes")
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise CaptionError(f"{where}: not a JSON line ({exc})") from exc
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                    and isinstance(entry.get("caption"), str)):
                raise CaptionError(f'{where}: expected {{"file": "...", "caption": "..."}} with string values')
            rel = posixpath.normpath(entry["file"])
            if rel.startswith(("/", "../")) or rel in ("..", ".") or "\0" in rel:
                skipped.append((where, f"file {entry['file']!r} is not a path inside images/"))
                continue
            text = clean_caption(entry["caption"])
            if not text:
                skipped.append((where, "empty caption"))
                continue
            found.setdefault(key_of(rel), []).append(_Caption(where, text, rel))
    return found


def scan_captioned(root: str | Path) -> tuple[FolderScan, list[str], list[str], list[tuple[str, str]]]:
    """Pair images and captions of a captioned folder: (scan with label = pair number, keys, captions, unpaired)."""
    root = os.fspath(root)
    layout = captioned_layout(root)
    root_real = os.path.realpath(root)
    img_dir = os.path.join(root, "images")
    scan = FolderScan([], [], [])
    images: dict[str, list[tuple[str, object]]] = {}
    for dirpath, files in walk_folder(img_dir, root_real, scan.skipped, IMG_EXTENSIONS):
        for fname, st in files:
            path = os.path.join(dirpath, fname)
            images.setdefault(key_of(os.path.relpath(path, img_dir)), []).append((path, st))
    refused: dict[str, list[tuple[str, str]]] = {}  # unusable caption files (empty, too big, not UTF-8) by key
    if layout == "folders":
        caps = _folder_captions(root, root_real, scan.skipped, refused)
    else:
        caps = _jsonl_captions(root, scan.skipped)
    unpaired: list[tuple[str, str]] = []
    keys, texts = [], []
    for key in sorted(images):
        found = images[key]
        if len(found) > 1:
            unpaired += [(p, f"{len(found)} images share the key {key!r}") for p, _ in found]
            continue
        path, st = found[0]
        entries = caps.get(key, [])
        name = os.path.relpath(path, img_dir).replace(os.sep, "/")
        entries = [c for c in entries if c.file in (None, name)]  # a jsonl line names the file, extension included
        if not entries:
            unpaired += refused.pop(key, None) or [(path, "image without a caption")]
            continue
        if len(entries) > 1:
            unpaired.append((path, f"{len(entries)} captions: " + ", ".join(c.source for c in entries)))
            continue
        scan.samples.append((path, len(keys)))
        scan.stamps.append(st)
        keys.append(key)
        texts.append(entries[0].text)
    names = {key: {os.path.relpath(p, img_dir).replace(os.sep, "/") for p, _ in v} for key, v in images.items()}
    for key in sorted(caps):
        for c in caps[key]:
            if key not in images or (c.file is not None and c.file not in names[key]):
                hint = f" {c.file!r} (paths are relative to images/)" if c.file is not None else ""
                unpaired.append((c.source, f"caption without an image{hint}"))
    unpaired += [item for items in refused.values() for item in items]  # unusable and without an image
    return scan, keys, texts, unpaired


def build_caption_index(
    root: str | Path,
    *,
    img_size: int | None = None,
    num_workers: int | None = None,
    cache: bool | str | Path = True,
    progress: bool | None = None,
) -> CaptionedIndex:
    """Pair, then validate the images of captioned folder `root` (as `build_index`); report what was left out."""
    root = os.fspath(root)
    scan, keys, texts, unpaired = scan_captioned(root)
    valid = validate_scan(root, scan, img_size=img_size, num_workers=num_workers, cache=cache, progress=progress)
    index = CaptionedIndex(
        root, [], valid.paths, list(range(len(valid.paths))), valid.sizes, valid.bad,
        keys=[keys[i] for i in valid.labels], captions=[texts[i] for i in valid.labels], unpaired=unpaired,
    )
    _report(index)
    return index


def _report(index: CaptionedIndex) -> None:
    for what, items in (("skipping", index.bad), ("leaving out", index.unpaired)):
        if items:
            n, named = len(items), listing([f"{show_path(p)} ({why})" for p, why in items])
            warnings.warn(f"{what} {n} file{'s' * (n != 1)} under {index.root!r}: {named}", stacklevel=3)
    if not index.paths:
        raise CaptionError(f"no captioned images under {index.root}: {index.summary()}")
