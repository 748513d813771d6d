"""The README's Python example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Example\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves a file
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    bank = namespace["bank"]
    assert bank.active is None and (tmp_path / "task.safetensors").exists()
    assert "task" in bank
