"""docs/api.md: every ```python block runs as written, and the pages point nowhere outside the repository."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"
PAGES = (API, ROOT / "README.md")


def python_blocks(text: str) -> list[tuple[str, str]]:
    """``(id, code)`` of every ```python block, the id naming the section it sits in."""
    blocks, section = [], "top"
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = slug(line.lstrip("#").strip())
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if line.strip() == "```python":
                blocks.append((f"{len(blocks):02d}-{section}", "".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def slug(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading (lower case, punctuation dropped, spaces to hyphens)."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


BLOCKS = python_blocks(API.read_text())


def test_the_page_has_examples():
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[name for name, _ in BLOCKS])
def test_python_block_runs(code, tmp_path):
    for module, needed in (("torch", "torch"), ("stable_baselines3", "stable_baselines3")):
        if re.search(rf"\b{needed}\b", code) and importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    if "to_torch" in code and importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch")
    script = tmp_path / "example.py"  # a file, so that its `if __name__ == "__main__":` guards work as usual
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"exit code {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_nothing_points_outside_the_repository(page):
    text = page.read_text()
    for needle in ("../", "..\\", "http://", "https://", "file://", "/work/",
                   "/home/", "~/"):
        assert needle not in text, f"{page.name} mentions {needle!r}"
    anchors = {slug(line.lstrip("#").strip()) for line in text.splitlines() if line.startswith("#")}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("#"):
            assert target[1:] in anchors, f"{page.name}: no heading for the link {target}"
            continue
        assert "://" not in target and not target.startswith(("/", "~")), f"{page.name}: link {target}"
        resolved = (page.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page.name}: link {target}"
