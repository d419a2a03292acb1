"""The import rules of docs/ARCHITECTURE.md, checked on every import of every module (inside functions too).

The layers are read from the document itself, so the picture a reader sees and the rule the code obeys are
one text. A violation names the importing file, its line and the rule it breaks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
_NET = {"model.network", "model.denoiser", "sampling.sampler"}
NO_MODEL = {"data": _NET, "text": _NET, "model.denoiser": {"model.network"}, "sampling.sampler": {"model.network"}}


def layers() -> dict[str, int]:
    """{jit_fast module or package: layer} from the `layer N name: modules` lines of ARCHITECTURE.md."""
    found = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"layer (\d+) [\w ]+:\s+(.+)$", line)
        if m:
            found.update(dict.fromkeys(m.group(2).split(), int(m.group(1))))
    return found


def module_name(path: Path) -> str:
    """Dotted name of a source file ('train.py' -> 'train', 'jit_fast/data/__init__.py' -> 'jit_fast.data')."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, text: str) -> list[tuple[int, str]]:
    """(line, absolute dotted module) of every import in `text` (the source of `path`), at any depth; relative
    imports resolved against `path`'s package; `importlib.import_module("literal")` counts too."""
    tree = ast.parse(text, str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names] + [(node.lineno, mod)]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            out.append((node.lineno, node.args[0].value))
    return out


def sources() -> list[Path]:
    """Every Python file of the project outside tests/."""
    folders = ("jit_fast", "jit_kernels", "benchmarks", "examples")
    return sorted([*(p for d in folders for p in (ROOT / d).rglob("*.py")), ROOT / "train.py", ROOT / "sample.py"])


def top(name: str) -> str:
    return name.split(".")[0]


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def jit_fast_part(name: str, layer_of: dict[str, int]) -> str:
    """The layer entry a `jit_fast...` name belongs to: the longest listed prefix of its dotted path (a package
    entry stands for all its modules), the path itself when none is listed, or `__init__` for a name the
    package itself exports (`from jit_fast import build_model`)."""
    parts = name.split(".")[1:]
    if not parts:
        return "__init__"
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in layer_of:
            return ".".join(parts[:n])
    folder = ROOT / "jit_fast" / parts[0]
    if len(parts) == 1 and folder.is_dir() and _docstring_only(folder / "__init__.py"):
        return ""  # `from jit_fast.sampling import generate` names the stage folder on the way to a module
    exists = folder.is_dir() or (ROOT / "jit_fast" / f"{parts[0]}.py").is_file()
    return ".".join(parts) if exists else "__init__"


def violations(path: Path, layer_of: dict[str, int], text: str | None = None) -> list[str]:
    """Every import of `path` (or of `text` as its source) that breaks a rule, as 'file:line: imports X (rule)'."""
    me = module_name(path)
    where = path.relative_to(ROOT).as_posix()
    bad = []
    for line, name in imports(path, path.read_text() if text is None else text):
        why = None
        if top(name) == "kernels":
            why = "the colliding name `kernels` is Hugging Face's"
        elif top(name) == "tests" and top(me) != "tests":
            why = "nothing imports tests"
        elif top(me) == "jit_kernels" and top(name) in {"jit_fast", "benchmarks", "examples"}:
            why = "jit_kernels imports nothing from the rest of the project"
        elif top(me) == "jit_fast" and top(name) in {"benchmarks", "examples"}:
            why = "jit_fast never imports benchmarks or examples"
        elif top(me) in {"train", "sample", "examples"} and top(name) in {"benchmarks", "examples"} - {top(me)}:
            why = "the CLIs and examples use only jit_fast and jit_kernels"
        elif top(me) == "jit_fast" and top(name) == "jit_fast" and name != "jit_fast":
            src, dst = jit_fast_part(me, layer_of), jit_fast_part(name, layer_of)
            if not dst:
                continue
            if dst not in layer_of or src not in layer_of:
                why = f"jit_fast.{dst if dst not in layer_of else src} is in no layer of docs/ARCHITECTURE.md"
            elif src != dst and layer_of[dst] > layer_of[src]:
                why = f"upward: layer {layer_of[src]} ({src}) imports layer {layer_of[dst]} ({dst})"
            elif dst in NO_MODEL.get(src, ()):
                why = f"{src} must not import {dst}"
        if why:
            bad.append(f"{where}:{line}: imports {name} ({why})")
    return bad


def test_every_module_keeps_the_import_rules() -> None:
    layer_of = layers()
    assert len(layer_of) > 25 and layer_of["model.network"] < layer_of["train.trainer"], "layers not in ARCHITECTURE.md"
    bad = [v for path in sources() for v in violations(path, layer_of)]
    assert not bad, "\n".join(bad)


def test_every_jit_fast_module_has_a_layer() -> None:
    """Every module of jit_fast (bar the stage folders' docstring-only __init__) has a layer line."""
    layer_of = layers()
    names = {jit_fast_part(module_name(p), layer_of) for p in (ROOT / "jit_fast").rglob("*.py")
             if not (p.name == "__init__.py" and p.parent != ROOT / "jit_fast" and _docstring_only(p))}
    assert not names - set(layer_of), f"add these to a layer of docs/ARCHITECTURE.md: {sorted(names - set(layer_of))}"


@pytest.mark.parametrize("src,code,rule", [
    ("jit_kernels/selfcheck.py", "def f():\n    import jit_fast\n", "jit_kernels imports nothing"),
    ("jit_fast/model/network.py", "def f():\n    from benchmarks import roofline\n", "never imports benchmarks"),
    ("jit_fast/model/network.py", "from jit_fast.train.trainer import Trainer\n",
     "upward: layer 1 (model.network) imports layer 3"),
    ("jit_fast/data/loader.py", "from ..model.network import JiT\n", "data must not import model.network"),
    ("jit_fast/sampling/sampler.py", "import importlib\nimportlib.import_module('jit_fast.model.network')\n",
     "sampling.sampler must not"),
    ("jit_fast/shared/errors.py", "from jit_fast import configs\n", "upward: layer 0 (shared) imports layer 0"),
    ("jit_fast/model/denoiser.py", "from jit_fast import build_model\n",
     "upward: layer 1 (model.denoiser) imports layer 3"),
    ("jit_fast/train/ema.py", "from jit_fast.sampling import generate\n", "upward: layer 0 (train.ema)"),
    ("jit_fast/memory_plan.py", "from jit_fast.sampling.new_stage import x\n", "sampling.new_stage is in no layer"),
    ("examples/toy_manifold.py", "import kernels\n", "colliding name"),
])
def test_a_planted_violation_is_named(src: str, code: str, rule: str) -> None:
    """Each rule fires on a planted import (the errors -> configs case is same-layer, so it must NOT fire)."""
    path = ROOT / src
    found = violations(path, layers(), path.read_text() + "\n" + code)
    if "layer 0 (shared) imports layer 0" in rule:
        assert not found
    else:
        assert any(rule in v for v in found), found
