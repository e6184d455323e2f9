"""The README's commands and code are true."""

import re
import shlex
from pathlib import Path

import torch
from lapvqa_hf.convert.diffvqa import convert_diffvqa

from lapvqa_hf.original import DiffVQAHead, randomize_

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CI_RUN = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def test_usage_snippet_runs_on_a_converted_checkpoint(tmp_path, monkeypatch):
    source = tmp_path / "coca_best.pt"
    head = DiffVQAHead(vis_dim=768, d_model=64, nhead=4, num_layers=2, dim_feedforward=96)
    torch.save(randomize_(head).state_dict(), source)
    convert_diffvqa(source, "coca", tmp_path / "lapvqa-diffvqa-coca", num_attention_heads=4, log=lambda _: None)
    snippet = re.search(r"## Load and generate\n\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert len(namespace["answers"]) == 2 and all(isinstance(a, str) for a in namespace["answers"])


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"Tests \(offline; what `.ci/run` runs\):\n\n```bash\n(.*?)\n```", README, re.S)
    assert len(commands) == 1
    steps = [shlex.split(step) for step in commands[0].split(" && ")]
    assert steps[-1] == [".venv/bin/python", "-m", "pytest", "-n", "2", "-q"]
    assert ".venv/bin/python -m pytest -n 2 -q" in CI_RUN
    assert "torch==2.13.0" in CI_RUN and '-e ".[dev]"' in CI_RUN
