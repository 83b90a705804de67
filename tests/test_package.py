"""The package's public names: every one resolves, and the two that share a module's name stay callable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attnmap

PYTHON_DIR = Path(__file__).resolve().parent.parent / "python"


def test_every_public_name_resolves() -> None:
    for name in attnmap.__all__:
        assert getattr(attnmap, name) is not None, name


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
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(PYTHON_DIR), "PATH": ""},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
