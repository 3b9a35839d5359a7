"""The README's Python snippet runs as written (so it cannot rot)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(section: str, language: str) -> str:
    """The first fenced `language` block under the README heading `section`."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    heading = re.search(rf"^#+ {re.escape(section)}\s*$", text, re.MULTILINE)
    assert heading, f"README.md has no section {section!r}"
    block = re.search(rf"```{language}\n(.*?)```", text[heading.end() :], re.DOTALL)
    assert block, f"README.md section {section!r} has no {language} block"
    return block.group(1)


@pytest.mark.tensorflow_only
@pytest.mark.slow
def test_python_snippet_runs(tmp_path):
    code = readme_block("Use it from Python", "python")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the snippet prints a generation"
    assert (tmp_path / "primer.keras").is_file()
    assert (tmp_path / "primer_preset" / "config.json").is_file()
