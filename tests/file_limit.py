"""Run a ``python -m`` module in a child process under a file-size limit.

Under RLIMIT_FSIZE, write(2) past the limit fails with EFBIG ("File too large") the way
it fails with ENOSPC on a full disk: a real refusal by the system, no root and no small
file system needed. The child ignores SIGXFSZ, which would otherwise kill it.

``from_call="package.module:Class.method"`` sets the limit only when that method is
first called, for a command that writes larger files of its own before the part under
test (DALI, building a pipeline, writes its generated code to a temp file).
"""

from __future__ import annotations

import subprocess
import sys

_PRELUDE = """\
import functools, importlib, resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit, from_call = int(sys.argv[1]), sys.argv[2]
sys.argv = sys.argv[3:]

def set_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

if from_call:
    module, _, attr = from_call.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    method = getattr(owner, name)

    @functools.wraps(method)
    def limited(*args, **kwargs):
        set_limit()
        return method(*args, **kwargs)

    setattr(owner, name, limited)
else:
    set_limit()
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_module_under_file_size_limit(module: str, args: list, limit: int, *, from_call: str = "",
                                     cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PRELUDE, str(limit), from_call, module, *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)
