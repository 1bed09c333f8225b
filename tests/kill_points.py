"""Kill-9 testing of writers: run a writer in a forked child and SIGKILL it just before its n-th file-system write.

The child counts the writes it is about to make through Python's audit hooks (`sys.addaudithook`): opening a file for
writing, creating, renaming/replacing, removing a file or folder. Writes done inside native code without a Python
call (safetensors' Rust writer) are not points of their own; the renames around them are. Forking keeps the loaded
modules and models, so each kill point costs one write, not one interpreter start.
"""

import os
import signal
import sys

WRITE_EVENTS = {
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "shutil.rmtree",
    "os.truncate",
    "os.link",
    "os.symlink",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHILD_TIMEOUT_S = 120
ARMED = True
"""Whether the child counts writes; a test sets it False in `write` and True around the part it means to kill."""


def _is_write(event: str, args: tuple) -> bool:
    if event in WRITE_EVENTS:
        return True
    if event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        if isinstance(mode, str):
            return any(character in mode for character in "wax+")
        return isinstance(flags, int) and bool(flags & WRITE_FLAGS)
    return False


def run_killed_before_write(write, n: int) -> bool:
    """Runs `write()` in a child process that is SIGKILLed just before its `n`-th write; True if it finished first.

    Raises:
        `AssertionError`: if the writer raised, or the child died otherwise (a hang ends it after `CHILD_TIMEOUT_S`).
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        try:
            signal.alarm(CHILD_TIMEOUT_S)
            count = 0

            def hook(event, args):
                nonlocal count
                if ARMED and _is_write(event, args):
                    count += 1
                    if count >= n:
                        os.kill(os.getpid(), signal.SIGKILL)

            sys.addaudithook(hook)
            write()
        except BaseException as error:  # noqa: BLE001 - reported through the exit status
            print(f"writer failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, f"the writer died of signal {os.WTERMSIG(status)}"
        return False
    assert os.WEXITSTATUS(status) == 0, "the writer raised (see its stderr)"
    return True


def every_kill_point(write, reset, check, stride: int = 1, limit: int = 400) -> int:
    """Kills `write` before its 1st, (1 + stride)-th, ... write until it finishes; `check(n, finished)` after each.

    `reset()` puts the old state back before each run. With `stride` 1 every write is a kill point; a larger one
    samples them (the run that finishes is always checked). Returns the last kill point tried.
    """
    for n in range(1, limit + 1, stride):
        reset()
        finished = run_killed_before_write(write, n)
        check(n, finished)
        if finished:
            return n
    raise AssertionError(f"the writer made more than {limit} writes")
