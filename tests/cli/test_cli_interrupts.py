"""Ctrl-C at the moments that are hard to hit by hand: while a model loads, and while the
``rolechat`` command is still importing its modules. Each is made to happen at exactly that
moment in a child process, the way a person pressing Ctrl-C would: SIGINT to the process."""

from __future__ import annotations

import subprocess
import sys

from cli.conftest import ROLECHAT, terminal_signals
from rolechat.store import Store

#: ``rolechat ARGS``, with SIGINT sent while the model loads, from inside a Python callback
#: that native code makes (llama.cpp's log callback runs all through a load). ctypes prints a
#: KeyboardInterrupt raised in a callback and drops it.
DURING_LOAD = """
import ctypes, os, signal, sys
import rolechat.cli.options as options

load = options.load_engine

def interrupted_load(*args, **kwargs):
    def compare(a, b):
        os.kill(os.getpid(), signal.SIGINT)
        return 0
    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(compare)
    items = (ctypes.c_int * 2)(2, 1)
    ctypes.CDLL(None).qsort(items, 2, ctypes.sizeof(ctypes.c_int), callback)
    return load(*args, **kwargs)

options.load_engine = interrupted_load
from rolechat.cli import main
sys.argv = ["rolechat", *sys.argv[1:]]
main()
"""

#: The ``rolechat`` console script, with SIGINT sent while it imports ``MODULE``.
DURING_IMPORT = """
import os, runpy, signal, sys

module, script = sys.argv[1:3]

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["rolechat", *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def run(cli, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=cli.env, cwd=cli.tmp, timeout=120, check=False,
                          preexec_fn=terminal_signals)


def test_ctrl_c_while_the_model_loads_exits_130_and_saves_nothing(cli):
    result = run(cli, DURING_LOAD, "ask", "hello", *cli.FAST)
    assert result.returncode == 130, result
    assert result.stdout == "" and "Traceback" not in result.stderr, result
    store = Store(cli.home / "rolechat.db")
    assert store.latest() is None  # no conversation, no message
    store.close()


def test_ctrl_c_during_start_up_imports_exits_130_without_a_traceback(cli):
    for module in ("rolechat.params", "click", "rolechat.cli.repl"):
        result = run(cli, DURING_IMPORT, module, str(ROLECHAT), "personas")
        assert result.returncode == 130, (module, result)
        assert "Traceback" not in result.stderr and result.stdout == "", (module, result)
    assert run(cli, DURING_IMPORT, "no.such.module", str(ROLECHAT), "personas").returncode == 0
