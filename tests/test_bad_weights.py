"""Weights that would sample garbage are refused at load (issue 26, item 2): non-finite values or a dtype the
model does not have, in any checkpoint kind (DCP, official .pth, .safetensors), at every entry point (sample.py,
`python -m jit_fast.export`, `train.py --resume` / `--auto-resume`). One line names the file and the tensor, exit 2,
and nothing is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, subprocess_env, tiny_argv

from jit_fast.checkpoint import latest_checkpoint
from jit_fast.checkpoint.dcp import load_dcp_keys
from jit_fast.checkpoint.safe_dcp import load_metadata
from jit_fast.checkpoint.weights import export_checkpoint
from jit_fast.export import main as export_main
from jit_fast.model.network import build_model
from jit_fast.sampling.generate import main as sample_main
from jit_fast.shared import integrity
from jit_fast.train.trainer import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")
TENSOR = "blocks.1.attn.qkv.weight"
BAD_VALUES = 12


@pytest.fixture(scope="module")
def run2(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine 2-step run of the tiny model (checkpoint step 2)."""
    out = tmp_path_factory.mktemp("run2")
    assert train_main(tiny_argv(data, out, "--max-steps", "2")) == 0
    return out


def poison(t: torch.Tensor, how: str) -> torch.Tensor:
    """`t` with BAD_VALUES entries NaN/Inf ("nan"), or cast to int32 ("int32")."""
    if how == "int32":
        return t.to(torch.int32)
    t = t.clone()
    flat = t.view(-1)
    flat[: BAD_VALUES // 2] = float("nan")
    flat[BAD_VALUES // 2 : BAD_VALUES] = float("inf")
    return t


def bad_dcp_run(run2: Path, dest: Path, how: str) -> Path:
    """A copy of `run2` whose checkpoint was saved (by DCP, checksums sealed) with a poisoned EMA 1 tensor."""
    import torch.distributed.checkpoint as dcp

    shutil.copytree(run2, dest)
    ckpt = latest_checkpoint(dest)
    tops = {k.split(".")[0] for k in load_metadata(ckpt / ".metadata").state_dict_metadata}
    state = load_dcp_keys(ckpt, tops)
    state["ema1"][TENSOR] = poison(state["ema1"][TENSOR], how)
    for f in ckpt.iterdir():
        if f.suffix == ".distcp" or f.name == ".metadata":
            f.unlink()
    with pytest.warns(UserWarning):
        dcp.save(state, checkpoint_id=ckpt, no_dist=True)
    integrity.write_manifest(ckpt, integrity.digest_files(ckpt, integrity.checkpoint_files(ckpt)))
    return dest


def bad_pth(run2: Path, dest: Path, how: str) -> Path:
    """An official .pth exported from `run2` with a poisoned model_ema1 tensor."""
    export_checkpoint(run2, dest)
    ck = torch.load(dest, weights_only=False)
    ck["model_ema1"][f"net.{TENSOR}"] = poison(ck["model_ema1"][f"net.{TENSOR}"], how)
    torch.save(ck, dest)
    return dest


def bad_safetensors(run2: Path, dest: Path, how: str) -> Path:
    """A .safetensors export of `run2`'s EMA 1 with one poisoned tensor (its jit_fast header kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    export_checkpoint(run2, dest)
    with safe_open(str(dest), framework="pt") as f:
        header = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd[TENSOR] = poison(sd[TENSOR], how)
    save_file(sd, str(dest), metadata=header)
    return dest


def one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def expected(how: str, entry: str) -> str:
    if how == "nan":
        return f"tensor '{TENSOR}' in {entry} has {BAD_VALUES} non-finite values"
    return f"tensor '{TENSOR}' in {entry} is torch.int32"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_weight_of_the_model_is_floating_point() -> None:
    """The dtype rule ("JiT weights are floating point") is the model's: class and text nets, every entry."""
    for net in (build_model("JiT-T/4", img_size=16, num_classes=4),
                build_model("JiT-T/4-Text", img_size=16, text_dim=8, text_tokens="sequence", null_text="empty")):
        assert all(v.is_floating_point() for v in net.state_dict().values())


ENTRY = {"dcp": "ema1", "pth": "model_ema1", "safetensors": "ema1"}
# a .safetensors file holds no training state: --resume refuses it for that reason alone
CASES = [(k, h, e) for k in ENTRY for h in ("nan", "int32") for e in ("sample", "export", "resume")
         if (k, e) != ("safetensors", "resume")]


@pytest.mark.parametrize(("kind", "how", "entry_point"), CASES, ids=["-".join(c) for c in CASES])
def test_bad_weights_are_refused_with_the_tensor_named(kind: str, how: str, entry_point: str, data: Path,
                                                       run2: Path, tmp_path: Path, capsys) -> None:
    entry = ENTRY[kind]
    src = {"dcp": lambda: latest_checkpoint(bad_dcp_run(run2, tmp_path / "run", how)),
           "pth": lambda: bad_pth(run2, tmp_path / "bad.pth", how),
           "safetensors": lambda: bad_safetensors(run2, tmp_path / "bad.safetensors", how)}[kind]()
    capsys.readouterr()
    out = tmp_path / "out"
    if entry_point == "sample":
        code = sample_main(["--ckpt", str(src), "--num-images", "2", "--batch-size", "2", "--steps", "1",
                            "--no-metrics", "--out", str(out)])
    elif entry_point == "export":
        code = export_main([str(src), str(out / "w.safetensors")])
    else:
        code = train_main(tiny_argv(data, out, "--max-steps", "4", "--resume", str(src)))
    line = one_line(capsys.readouterr().err)
    assert code == 2, line
    assert expected(how, entry) in line, line
    assert str(src) in line, line
    assert not out.exists() or tree(out) == {}, sorted(tree(out))


def test_auto_resume_of_a_nan_checkpoint_changes_nothing(data: Path, run2: Path, tmp_path: Path, capsys) -> None:
    run = bad_dcp_run(run2, tmp_path / "run", "nan")
    before = tree(run)
    assert train_main(tiny_argv(data, run, "--max-steps", "4", "--auto-resume")) == 2
    assert expected("nan", "ema1") in one_line(capsys.readouterr().err)
    assert tree(run) == before


@pytest.mark.parametrize("cli", ["sample.py", "export", "train.py"])
def test_real_processes_refuse_a_nan_checkpoint(cli: str, data: Path, run2: Path, tmp_path: Path) -> None:
    """The real CLIs in their own processes: exit 2, one `error:` line naming file and tensor, no traceback."""
    ckpt = latest_checkpoint(bad_dcp_run(run2, tmp_path / "run", "nan"))
    out = tmp_path / "out"
    cmd = {"sample.py": [str(REPO / "sample.py"), "--ckpt", str(ckpt), "--num-images", "2", "--batch-size", "2",
                         "--steps", "1", "--no-metrics", "--out", str(out)],
           "export": ["-m", "jit_fast.export", str(ckpt), str(out / "w.pth")],
           "train.py": [str(REPO / "train.py"), *tiny_argv(data, out, "--max-steps", "4", "--resume", str(ckpt))]}[cli]
    p = subprocess.run([sys.executable, *cmd], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    line = one_line(p.stderr)
    assert p.returncode == 2, p.stderr
    assert "error:" in line and expected("nan", "ema1") in line and str(ckpt) in line, line
    assert not out.exists() or tree(out) == {}


def test_genuine_checkpoints_still_load(run2: Path, tmp_path: Path) -> None:
    """The check refuses nothing sound: fp32 DCP, a .pth, bf16 safetensors weights sample."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from jit_fast.checkpoint import load_weights

    for src in (run2, export_checkpoint(run2, tmp_path / "w.pth")):
        assert load_weights(src, "ema1")[0]
    st = export_checkpoint(run2, tmp_path / "w.safetensors")
    with safe_open(str(st), framework="pt") as f:
        header, sd = f.metadata(), {k: f.get_tensor(k).bfloat16() for k in f.keys()}
    save_file(sd, str(st), metadata=header)
    assert json.loads(header["jit_fast_meta"])["model"] == "JiT-T/4"
    assert load_weights(st, "ema1")[0]
