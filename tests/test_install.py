"""The install as a user meets it: the project imports from anywhere, under names no dependency takes.

Hugging Face's `kernels` (required by transformers >= 5.25) installs a top-level `kernels`; this project's
kernel package once had that import name, so outside the checkout `import jit_fast` picked up theirs and
inside it ours shadowed theirs for transformers. Every test here runs in a subprocess whose working
directory is outside the checkout and whose environment has no PYTHONPATH, as a user's script would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLLIDING = "kernels"  # the import name of Hugging Face's hub-kernel loader


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH, no test interpreter settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=user_env(**env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args} in {cwd} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def python(code: str, cwd: Path, **env: str) -> dict:
    """Run `code` (which prints one JSON line last) in a fresh interpreter; its parsed output."""
    r = run([sys.executable, "-c", textwrap.dedent(code)], cwd, **env)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    """A folder holding a package named like the colliding one: importing it leaves a mark and fails."""
    pkg = tmp_path / "standin" / COLLIDING
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import os\nos.environ['STANDIN_IMPORTED'] = '1'\n"
                                     "raise ImportError('the stand-in package was imported')\n")
    return pkg.parent


def test_packages_resolve_to_this_checkout_from_anywhere(tmp_path: Path) -> None:
    """(a) From a folder outside the checkout: both packages are this project's files, and a tiny model runs."""
    out = python("""
        import json, torch, jit_fast, jit_kernels
        net = jit_fast.build_model("JiT-T/4", img_size=16, num_classes=3, kernels="torch")
        x = net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 2]))
        print(json.dumps(dict(jit_fast=jit_fast.__file__, jit_kernels=jit_kernels.__file__,
                              shape=list(x.shape), finite=bool(torch.isfinite(x).all()))))
    """, tmp_path)
    assert Path(out["jit_fast"]).resolve() == ROOT / "jit_fast" / "__init__.py"
    assert Path(out["jit_kernels"]).resolve() == ROOT / "jit_kernels" / "__init__.py"
    assert out["shape"] == [2, 3, 16, 16] and out["finite"]


def test_nothing_imports_the_colliding_name(tmp_path: Path, standin: Path) -> None:
    """(b) A package named like Hugging Face's first on sys.path: importing every module of ours never touches it."""
    out = python(f"""
        import importlib, json, os, pkgutil, sys
        import jit_fast, jit_kernels
        names = []
        for pkg in (jit_fast, jit_kernels):
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                importlib.import_module(info.name)
                names.append(info.name)
        net = jit_fast.build_model("JiT-T/4", img_size=16, num_classes=3, kernels="triton")
        print(json.dumps(dict(modules=len(names), imported="{COLLIDING}" in sys.modules,
                              marked=os.environ.get("STANDIN_IMPORTED") == "1")))
    """, tmp_path, PYTHONPATH=str(standin))
    assert out["modules"] > 40 and not out["imported"] and not out["marked"]


@pytest.mark.parametrize("where", [".", "examples", "benchmarks", "tests"])
def test_the_checkout_does_not_shadow_the_colliding_name(where: str, standin: Path) -> None:
    """(b) Where our scripts run from (the root for train.py/sample.py, examples/, ...), the colliding name still
    resolves to the installed package: a folder of ours named like it would come first on sys.path and win."""
    out = python(f"""
        import importlib.util, json
        spec = importlib.util.find_spec("{COLLIDING}")
        print(json.dumps(dict(origin=spec.origin if spec else None)))
    """, ROOT / where, PYTHONPATH=str(standin))
    assert out["origin"] == str(standin / COLLIDING / "__init__.py")


def test_toy_example_runs_from_outside_the_checkout(tmp_path: Path) -> None:
    """(c) The README's `python examples/toy_manifold.py`: its own folder comes first on sys.path, not the root."""
    run([sys.executable, str(ROOT / "examples" / "toy_manifold.py"), "--quick", "--dims", "2",
         "--out", "toy"], tmp_path)
    assert set(json.loads((tmp_path / "toy" / "results.json").read_text())) == {"x", "eps", "v"}


def test_text_encoder_path_runs_from_outside_the_checkout(tmp_path: Path) -> None:
    """(c) The text demo's encoder path from outside the checkout: transformers (with Hugging Face's `kernels`
    installed beside it) loads the tiny local encoder and the captions are encoded into a cache."""
    run([sys.executable, "-c", "from jit_fast.data import demo_text_encoder, prepare_demo_text; "
         "prepare_demo_text('data', size=16); demo_text_encoder('enc')"], tmp_path)
    root = next(p for p in (tmp_path / "data").iterdir() if p.is_dir())
    run([sys.executable, "-m", "jit_fast.data.encode_text", str(root), "--encoder", "enc/demo_text_encoder",
         "--out", "cache.textcache"], tmp_path)
    assert (tmp_path / "cache.textcache").exists()


def test_sample_cli_runs_from_outside_the_checkout(tmp_path: Path) -> None:
    """(c) `python /path/to/sample.py ...` from a user's folder writes its outputs there."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from sampling_utils import tiny_checkpoint
    finally:
        sys.path.remove(str(ROOT / "tests"))
    ckpt = tiny_checkpoint(tmp_path / "checkpoint-last.pth")
    run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(ckpt), "--num-images", "4", "--batch-size", "4",
         "--steps", "2", "--no-metrics", "--out", "eval"], tmp_path)
    assert (tmp_path / "eval" / "samples.npz").exists() and (tmp_path / "eval" / "metrics.json").exists()
