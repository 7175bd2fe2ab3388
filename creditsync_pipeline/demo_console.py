"""The demo's terminal: every child's output goes to a log file, the operator lines to the terminal.

``creditsync demo`` runs several processes (the billing simulator, the first job, ``creditsync
serve``, ``dagster dev`` with its daemon, sensors and runs). Their output -- Dagster's DEBUG
events, the daemon's sensor INFO lines every few seconds, warnings -- goes to
``<demo>/logs/<child>.log``; only the lines an operator reads (:data:`OPERATOR_MARKERS`, the
runbook's ``grep CreditSync``) are echoed to the terminal, one short line each, so the
banner stays on screen.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx

__all__ = ["OPERATOR_MARKERS", "Child", "operator_line", "say", "wait_until_up"]

#: a line holding one of these is an operator line (SPEC "Interfaces" and "Rollback, diagnosis and logs")
OPERATOR_MARKERS = ("[CreditSync]", "Synced credits", "Updating instance plan")
#: Dagster's console format: "<time> - dagster - <LEVEL> - <job> - <run id> - ..."
_DAGSTER_RE = re.compile(r" - dagster - [A-Z]+ - (\w+) - [0-9a-f]{8}-[0-9a-f-]{27} - ")
#: terminal colours (Dagster's daemon colours its lines even into a pipe): stripped from the log files
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_print_lock = threading.Lock()


def say(text: str, out: IO[str] | None = None) -> None:
    """One line (or block) on the terminal, never interleaved with a child's operator line."""
    with _print_lock:
        print(text, file=out or sys.stdout, flush=True)


def operator_line(line: str, source: str) -> str | None:
    """The terminal form of ``line`` when it is an operator line (``HH:MM:SS source  text``), else None.

    ``source`` is the child's name; a Dagster run's line names its job instead.
    """
    found = [line.find(marker) for marker in OPERATOR_MARKERS if marker in line]
    if not found:
        return None
    job = _DAGSTER_RE.search(line)
    return f"{time.strftime('%H:%M:%S')} {job.group(1) if job else source}  {line[min(found):].rstrip()}"


class Child:
    """A child process: stdout and stderr appended to ``<log_dir>/<name>.log``, operator lines echoed."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log_dir: Path,
                 cwd: Path | None = None, out: IO[str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.out = out
        self._last: deque[str] = deque(maxlen=20)
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by the pump
        self.proc = subprocess.Popen(
            list(args), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1,
        )
        self._pump = threading.Thread(target=self._copy, name=f"demo-{name}", daemon=True)
        self._pump.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = _ANSI_RE.sub("", raw)
                self._log.write(line)
                self._log.flush()
                self._last.append(line.rstrip())
                shown = operator_line(line, self.name)
                if shown is not None:
                    say(shown, self.out)
        finally:
            self._log.close()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end (and its output to be copied)."""
        code = self.proc.wait(timeout=timeout)
        self._pump.join(timeout=5)  # a grandchild may still hold the pipe: do not wait for it
        return code

    def last_lines(self) -> list[str]:
        """The last lines it printed (for a failure message)."""
        return list(self._last)

    def stop(self, sig: int, grace: float) -> None:
        """Ask it to stop, then insist."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump.join(timeout=5)


def wait_until_up(child: Child, url: str, what: str, timeout: float) -> None:
    """Poll ``url`` until it answers 200; RuntimeError when ``child`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"{what} exited with code {child.proc.returncode} (see {child.log_path})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not start within {timeout:g} s (see {child.log_path})")
