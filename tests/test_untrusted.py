"""Untrusted files never run code: crafted DCP metadata / shard entries and Inception weights at every entry point.

Each crafted file's payload touches a marker file when unpickled the ordinary way (checked by
`test_crafted_files_are_live`), so a loader that unpickles it unsafely leaves the marker behind.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sampling_utils import random_inception_weights
from train_helpers import REPO, subprocess_env, tiny_argv

from jit_fast.checkpoint import CheckpointError, latest_checkpoint, load_weights
from jit_fast.checkpoint.safe_dcp import load_metadata
from jit_fast.export import main as export_main
from jit_fast.sampling.generate import main as sample_main
from jit_fast.shared import integrity
from jit_fast.train.trainer import main as train_main


class Payload:
    """Unpickling this creates `marker` (through os.system, as a real attack would run a command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def run2(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine 2-step run (checkpoint step 2, with checksums.json)."""
    out = tmp_path_factory.mktemp("run2")
    assert train_main(tiny_argv(data, out, "--max-steps", "2")) == 0
    return out


def reseal(ckpt: Path) -> None:
    """Rewrite checksums.json for the tampered files: the attacker controls the whole directory."""
    integrity.write_manifest(ckpt, integrity.digest_files(ckpt, integrity.checkpoint_files(ckpt)))


def crafted_metadata_run(run2: Path, dest: Path, marker: Path) -> Path:
    """A copy of `run2` whose newest checkpoint's .metadata is a pickle that runs a command."""
    shutil.copytree(run2, dest)
    ckpt = latest_checkpoint(dest)
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(ckpt)
    return dest


def crafted_bytes_entry_run(run2: Path, dest: Path, marker: Path) -> Path:
    """A copy of `run2` whose genuine .metadata points an optimizer hyper-parameter at a command-running pickle.

    torch's planner loads such non-tensor entries with torch.load(weights_only=False).
    """
    shutil.copytree(run2, dest)
    ckpt = latest_checkpoint(dest)
    md = load_metadata(ckpt / ".metadata")
    index, info = next((i, s) for i, s in md.storage_data.items() if i.fqn.startswith("optim.param_groups."))
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    shard = ckpt / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    reseal(ckpt)
    return dest


def one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_crafted_files_are_live(run2: Path, tmp_path: Path) -> None:
    """The payloads do run under the loaders they target (plain pickle, DCP's own reader, weights_only=False)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    m1, m2, m3 = tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"
    with open(latest_checkpoint(crafted_metadata_run(run2, tmp_path / "a", m1)) / ".metadata", "rb") as f:
        pickle.load(f)
    assert m1.exists()
    ckpt = latest_checkpoint(crafted_bytes_entry_run(run2, tmp_path / "b", m2))
    with pytest.warns(UserWarning, match="single process"):
        _load_state_dict_from_keys(keys={"optim"}, storage_reader=FileSystemReader(str(ckpt)))
    assert m2.exists()
    torch.save({"fc.weight": torch.zeros(1), "x": Payload(m3)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert m3.exists()


@pytest.mark.parametrize("craft", [crafted_metadata_run, crafted_bytes_entry_run], ids=["metadata", "bytes-entry"])
@pytest.mark.parametrize("entry", ["resume", "auto-resume", "sample", "export"])
def test_crafted_checkpoint_is_refused(entry: str, craft, data: Path, run2: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    run = craft(run2, tmp_path / "run", marker)
    ckpt = latest_checkpoint(run)
    if entry == "resume":
        code = train_main(tiny_argv(data, tmp_path / "out", "--max-steps", "4", "--resume", str(ckpt)))
    elif entry == "auto-resume":
        code = train_main(tiny_argv(data, run, "--max-steps", "4", "--auto-resume"))
    elif entry == "sample":
        code = sample_main(["--ckpt", str(run), "--ema", "ema1,model" if craft is crafted_bytes_entry_run else "ema1",
                            "--num-images", "2", "--batch-size", "2", "--steps", "1", "--no-metrics",
                            "--out", str(tmp_path / "samples")])
    else:
        code = export_main([str(run), str(tmp_path / "w.pth")])
    err = capsys.readouterr().err
    assert not marker.exists(), "the crafted checkpoint ran code"
    if entry == "sample" and craft is crafted_bytes_entry_run:
        # sampling reads weights only: the optimizer entry is never loaded, which is just as safe
        assert code == 0, err
        return
    assert code == 2, err
    line = one_error_line(err)
    assert "refused to load" in line
    assert (".metadata" if craft is crafted_metadata_run else "__0_") in line, line


def test_export_cli_process_refuses_crafted_metadata(run2: Path, tmp_path: Path) -> None:
    """`python -m jit_fast.export` in its own process: exit 2, one line, no marker."""
    marker = tmp_path / "MARKER"
    run = crafted_metadata_run(run2, tmp_path / "run", marker)
    p = subprocess.run([sys.executable, "-m", "jit_fast.export", str(run), str(tmp_path / "w.safetensors")],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "refused to load" in one_error_line(p.stderr) and not marker.exists()


def test_metadata_allow_list_loads_genuine_checkpoints(run2: Path) -> None:
    """The allow-list is not too tight: a genuine checkpoint's metadata and weights load."""
    md = load_metadata(latest_checkpoint(run2) / ".metadata")
    assert any(k.startswith("optim.param_groups.") for k in md.state_dict_metadata)
    sd, meta = load_weights(run2, "ema1")
    assert meta.step == 2 and sd


def test_load_weights_refuses_a_non_metadata_pickle(run2: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    ckpt = latest_checkpoint(run)
    (ckpt / ".metadata").write_bytes(pickle.dumps({"just": "a dict"}))
    reseal(ckpt)
    with pytest.raises(CheckpointError, match=r"\.metadata: it holds a dict, not DCP Metadata"):
        load_weights(run, "ema1")


def test_crafted_inception_weights_leave_no_marker(run2: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": Payload(marker)}, evil)
    code = sample_main(["--ckpt", str(run2), "--num-images", "2", "--batch-size", "2", "--steps", "1",
                        "--inception-weights", str(evil), "--out", str(tmp_path / "samples")])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "refused to load Inception weights" in line and str(evil) in line
    assert not marker.exists()


def test_inception_weights_are_validated(tmp_path: Path) -> None:
    """Weights-only files that are not torch-fidelity's InceptionV3 are refused with the key named."""
    from jit_fast.sampling import fid

    good = random_inception_weights(tmp_path / "good.pth")
    sd = torch.load(good, weights_only=True)
    net = fid.build_inception(good)
    assert torch.equal(net.fc.weight, sd["fc.weight"])
    cases = {
        "shape": ({**sd, "fc.weight": sd["fc.weight"][:10]}, r"fc.weight is torch.float32 \(10, 2048\)"),
        "missing": ({k: v for k, v in sd.items() if k != "fc.bias"}, "1 missing keys"),
        "nan": ({**sd, "fc.bias": torch.full_like(sd["fc.bias"], float("nan"))}, "fc.bias holds NaN"),
        "not a dict": ([1, 2, 3], "does not hold a state dict"),
    }
    for name, (obj, msg) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        with pytest.raises(fid.InceptionWeightsError, match=msg):
            fid.build_inception(path)
