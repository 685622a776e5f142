"""The seed tutorial's In[16] three-turn conversation, run as a user would run it, with what
each `chat_turn` call returned recorded and checked against the tutorial's structure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tutorial.py"
PROMPTS = ["我想学做一道最简单的家常菜", "能再具体点吗？比如火候。", "我不吃糖，怎么办？"]
#: Runs the example unchanged, recording every chat_turn result (the example imports
#: chat_turn from rolechat when it runs, so it gets the recording one).
RECORDER = """
import json, runpy, sys
import rolechat
calls = []
real = rolechat.chat_turn
def recording(*args, **kwargs):
    result = real(*args, **kwargs)
    calls.append({"args": [list(map(list, args[2])), args[3]], "result": result})
    return result
rolechat.chat_turn = recording
runpy.run_path(sys.argv[1], run_name="__main__")
with open(sys.argv[2], "w", encoding="utf-8") as f:
    json.dump(calls, f, ensure_ascii=False)
"""


def test_tutorial_in16_runs_with_only_the_imports_changed(tmp_path: Path) -> None:
    source = EXAMPLE.read_text(encoding="utf-8")
    # The tutorial's own lines are all there, untouched.
    for line in ("history=[]", "response=chat_turn(model_instruct,tokenizer_instruct,history,"
                 "prompt_3)", "history=response['history']", "print(response['response']+'\\n')"):
        assert line in source
    record = tmp_path / "calls.json"
    done = subprocess.run([sys.executable, "-c", RECORDER, str(EXAMPLE), str(record)],
                          capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    calls = json.loads(record.read_text(encoding="utf-8"))
    assert [call["args"][1] for call in calls] == PROMPTS
    history: list[list[str]] = []
    printed = ""
    for call, prompt in zip(calls, PROMPTS):
        result = call["result"]
        assert set(result) == {"response", "generated_tokens_count", "history"}
        assert call["args"][0] == history  # each call got the history the last one returned
        assert isinstance(result["response"], str) and result["response"].strip()
        assert 1 <= result["generated_tokens_count"] <= 512  # the tutorial's max_new_tokens
        history = [*history, [prompt, result["response"]]]
        assert [list(turn) for turn in result["history"]] == history
        printed += result["response"] + "\n\n"
    assert done.stdout == printed  # exactly the three replies, as the tutorial prints them
