"""The README's code examples run as written (users copy them)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def _python_blocks():
  with open(README) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
  with open(README) as f:
    text = f.read()
  bash_blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
  assert len(bash_blocks) == 2, "README must give exactly two set-up commands"
  assert "adamix-train" in bash_blocks[0]
  test_command = bash_blocks[1].strip()
  assert "pytest" in test_command
  ci = open(os.path.join(os.path.dirname(README), ".ci", "run")).read()
  assert test_command in ci, ".ci/run must run the README's test command"


@pytest.mark.parametrize("index", range(2))
def test_readme_example_spends_at_most_its_epsilon(index, capsys):
  blocks = _python_blocks()
  assert len(blocks) >= 2
  namespace = {}
  exec(compile(blocks[index], f"README.md python block {index}", "exec"),
       namespace)
  ledger = namespace["ledger"]
  assert 0 < ledger.epsilon() <= ledger.target_epsilon
  assert "epsilon spent" in capsys.readouterr().out
