"""Build the wheel, install it into a fresh venv (no editable install) and import it there."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import sysconfig
import venv
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_installs_and_imports(tmp_path: pathlib.Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        ["maturin", "build", "--release", "--quiet", "--out", str(dist)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("attnmap-*.whl")
    assert "abi3" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert (
        "attnmap/render/heatmap.py" in names
        and "attnmap/_native.pyi" in names
        and "attnmap/py.typed" in names
    )
    assert any(n.startswith("attnmap/_native") and n.endswith(".so") for n in names)
    assert any(n.startswith("attnmap/reduce/kernels/") and n.endswith(".py") for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # unpack the wheel as pip would (pure file copy; no network), dependencies come from this venv after it
    zipfile.ZipFile(wheel).extractall(site)
    (pathlib.Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import attnmap, attnmap._native, attnmap.render as r, numpy as np, pathlib, sys;"
        f"assert pathlib.Path(attnmap.__file__).is_relative_to({site!r}), attnmap.__file__;"
        "assert issubclass(attnmap.AttnmapError, ValueError);"
        "import importlib.util; assert importlib.util.find_spec('attnmap.reduce.kernels') is not None;"
        "f = r.frames(np.random.rand(3, 4, 5).astype(np.float32), size=(8, 10), temporal_stride=2);"
        "assert f.shape == (5, 8, 10, 3) and f.dtype == np.uint8; print('ok', attnmap._native.__version__)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok 0.1.0")
    assert sys.version_info >= (3, 9)
