"""The package's public surface: the main verbs at the top, each the object its module defines; one
error root; a cheap import; and the names that share a module's name stay callable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnmap

PYTHON_DIR = Path(__file__).resolve().parent.parent / "python"


def fresh_interpreter(code: str) -> str:
    """What ``code`` prints in a new interpreter that finds only this tree's attnmap (and no tools)."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(PYTHON_DIR), "PATH": ""},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_public_names_are_the_objects_their_modules_define() -> None:
    import attnmap.analysis
    import attnmap.capture.real_video
    import attnmap.capture.recorder
    import attnmap.config
    import attnmap.errors
    import attnmap.layout
    import attnmap.reduce
    import attnmap.reduce.reference
    import attnmap.render
    import attnmap.render.options
    import attnmap.render.report
    import attnmap.render.videos
    import attnmap.store

    expected = {
        "AttnmapError": attnmap.errors.AttnmapError,
        "Config": attnmap.config.Config,
        "Layout": attnmap.layout.Layout,
        "Recorder": attnmap.capture.recorder.Recorder,
        "capture_video": attnmap.capture.real_video.capture_video,
        "RenderOptions": attnmap.render.options.RenderOptions,
        "analysis": attnmap.analysis,
        "attention_sums": attnmap.reduce.attention_sums,
        "open_store": attnmap.store.open_store,
        "reduce": attnmap.reduce,
        "reference": attnmap.reduce.reference,
        "render": attnmap.render,
        "render_video": attnmap.render.videos.render_video,
        "show": attnmap.render.report.show,
        "store": attnmap.store,
    }
    assert set(attnmap.__all__) == {*expected, "capture", "__version__"}
    for name, obj in expected.items():
        assert getattr(attnmap, name) is obj, name
    assert attnmap.capture.capture is attnmap.capture.recorder.capture  # the package, callable as it
    assert attnmap.__version__ == attnmap._native.__version__


def test_one_error_root() -> None:
    from attnmap import _native
    from attnmap.store import StoreError

    assert attnmap.AttnmapError is _native.AttnmapError  # the Rust core raises the same class
    assert issubclass(attnmap.AttnmapError, ValueError)
    assert issubclass(StoreError, attnmap.AttnmapError) and issubclass(StoreError, OSError)
    with pytest.raises(attnmap.AttnmapError, match=r"^layout must be an attnmap\.Layout"):
        attnmap.attention_sums(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), "self", ("temporal",))  # type: ignore[arg-type]
    with pytest.raises(attnmap.AttnmapError, match=r"^maps: expected a float array"):
        attnmap.render.frames(np.zeros((2, 2, 2), dtype=np.int32))


def test_import_is_cheap_and_render_needs_no_torch() -> None:
    code = (
        "import sys, numpy as np, attnmap, attnmap.render as r\n"
        "r.frames(np.random.rand(2, 3, 4).astype(np.float32), size=(6, 8))\n"
        "attnmap.open_store, attnmap.RenderOptions()\n"
        "print(sorted(m for m in ('torch', 'matplotlib', 'av') if m in sys.modules))\n"
    )
    assert fresh_interpreter(code) == "[]"


def test_capture_and_rollout_stay_callable_whatever_is_imported_first() -> None:
    # a fresh interpreter: importing the submodules first binds them over the package's functions
    code = (
        "import torch, attnmap\n"
        "import attnmap.capture, attnmap.analysis.rollout\n"
        "for name in attnmap.__all__: getattr(attnmap, name)\n"
        "assert callable(attnmap.capture) and callable(attnmap.analysis.rollout)\n"
        "a = torch.softmax(torch.randn(1, 2, 5, 5), -1)\n"
        "out = attnmap.analysis.rollout([a, a], head_fusion='max')\n"
        "ref = attnmap.analysis.rollout.rollout([a, a], head_fusion='max')\n"
        "assert torch.equal(out, ref) and out.shape == (1, 5, 5)\n"
        "try:\n"
        "    attnmap.capture(torch.nn.Linear(2, 2))\n"
        "except ValueError as e:\n"
        "    assert 'no attention module' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('capture of a module without attention did not raise')\n"
        "print('ok')\n"
    )
    assert fresh_interpreter(code) == "ok"


def test_the_repository_root_never_shadows_an_installed_package() -> None:
    """From the clone's root (a shell, a notebook, ``python -m``), the current folder comes first on
    sys.path; the top-level ``kernels/`` folder must not take the place of the ``kernels`` package that
    diffusers imports (installed with transformers)."""
    root = PYTHON_DIR.parent
    installed = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin)"],
        capture_output=True,
        text=True,
        cwd=PYTHON_DIR,  # a folder without a kernels/ of its own: what is installed
        check=False,
    )
    assert installed.returncode == 0 and installed.stdout.strip().endswith("__init__.py"), (
        f"the kernels package (a dependency of transformers) is not installed: {installed.stderr}"
    )
    code = "import kernels\nfrom diffusers import WanTransformer3DModel\nprint(kernels.__file__)\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=False, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == installed.stdout.strip()
    # the folder still leads to the kernel source, as a plain folder (a namespace portion never wins)
    assert not (root / "kernels" / "__init__.py").exists()
    assert (root / "kernels" / "attn_reduce.py").resolve() == (
        PYTHON_DIR / "attnmap" / "reduce" / "kernels" / "attn_reduce.py"
    )


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (anywhere in it, lazily or not;
    ``if TYPE_CHECKING:`` blocks aside), read from the source."""
    import ast

    root = Path(attnmap.__file__).parent
    mods = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def known(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        tree = ast.parse(f.read_text())
        hidden = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for b in node.body
            for n in ast.walk(b)
        }
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.Import):
                edges[m] |= {known(a.name) for a in node.names if a.name.startswith("attnmap")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnmap"):
                base = str(node.module)  # ``from pkg import x`` runs pkg's __init__ first
                edges[m] |= {known(base)} | {
                    f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods
                }
        edges[m].discard(m)
    return edges


def test_imports_run_one_way() -> None:
    """No module imports one that imports it back, directly or through others (a submodule that
    imports its own package, or a store that imports the renderer, would close a cycle)."""
    edges = _imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += edges[m]
        return False

    cycles = sorted((a, b) for a in edges for b in edges[a] if reaches(b, a))
    assert not cycles, f"imports that close a cycle: {cycles}"
    assert not any(
        e.startswith(("attnmap.render", "attnmap.capture"))
        for m in edges
        if m.startswith("attnmap.store")
        for e in edges[m]
    )
