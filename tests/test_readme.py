"""The README's runnable example runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
MARKED = re.compile(r"<!-- runs as a test -->\n```python\n(.*?)```", re.DOTALL)


def test_readme_has_the_two_commands_first() -> None:
    text = README.read_text()
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["bash scripts/demo.sh demo_out", "bash scripts/test.sh"]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (README.parent / script).is_file()


@pytest.mark.parametrize("index", range(len(MARKED.findall(README.read_text()))))
def test_readme_example_runs(index: int, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = MARKED.findall(README.read_text())[index]
    monkeypatch.chdir(tmp_path)
    # the example asserts its own results
    exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "readme_example"})
