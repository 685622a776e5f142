"""The seed tutorial's In[16] three-turn conversation, run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tutorial.py"


def test_tutorial_in16_runs_with_only_the_imports_changed() -> None:
    source = EXAMPLE.read_text(encoding="utf-8")
    # The tutorial's own lines are all there, untouched.
    for line in ("history=[]", "response=chat_turn(model_instruct,tokenizer_instruct,history,"
                 "prompt_3)", "history=response['history']", "print(response['response']+'\\n')"):
        assert line in source
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n\n") >= 3  # three replies, each followed by a blank line
