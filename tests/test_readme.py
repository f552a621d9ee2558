"""The README's segment-loop example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_segment_loop_example_runs():
    text = README.read_text()
    code = re.search(r"## The segment loop in 15 lines\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["envs"].closed
