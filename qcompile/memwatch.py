"""Peak memory of a running command and its children, as the kernel reports it (Linux ``/proc``).

Two figures, because they mean different things for a model compiler:

* **anonymous** memory (``Pss_Anon``): what the processes allocated themselves: arrays, tensors, the
  Python heap. This is what must fit in RAM, and what qcompile's memory bound is about.
* **file** pages (``Pss_File``): memory-mapped files (safetensors shards read in place, a GGUF that
  llama.cpp maps). They are the page cache's: shared, and dropped under memory pressure.

GNU time's and ``getrusage``'s maximum RSS add both together (and only per process), so they cannot tell
a model held in a float copy from a model file that is merely mapped; sampling ``/proc`` can.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _rss_kb(pid: int) -> tuple[int, int]:
    """(anonymous, file) KiB of one process, proportional: a page shared by n processes (a forked child's
    copy-on-write pages, a file mapped twice) counts 1/n in each, so sums over a tree count it once.
    Zeros once the process has exited."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    anon = int(line.split()[1])
                elif line.startswith("Pss_File:"):
                    file = int(line.split()[1])
    except OSError:
        pass
    return anon, file


# kcmp(2)'s number where it is known; other machines fall back to comparing the figures (below)
_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_KCMP_VM = 1


def _shares_memory(a: int, b: int) -> bool | None:
    """Whether two processes run in one address space (kcmp(2) KCMP_VM: true of a ``vfork`` child before its
    ``exec``, false of a forked child, whose pages are its own copy-on-write ones); None when the kernel
    will not say (no kcmp, a seccomp filter, a process gone)."""
    if _KCMP is None:
        return None
    r = _libc().syscall(_KCMP, a, b, _KCMP_VM, 0, 0)
    return None if r < 0 else r == 0


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def tree_rss_kb(pid: int) -> tuple[int, int]:
    """(anonymous, file) KiB summed over ``pid`` and all its descendants.

    A child between ``vfork`` and ``exec`` (how Python's subprocess starts a program) runs in its parent's
    address space while the parent waits: /proc shows it with exactly the parent's memory, proportional
    figures included (the pages are mapped once, by one shared mm). Counting both would double the parent
    for that instant (seen: a 310 MB process sampled at 627 MB), so such a child is counted once. The kernel
    says which children share the parent's address space (kcmp); asked first, so a child that execs in
    between is read as its own program. Where it cannot say, a child whose anonymous figure is within 1 %
    (at least 1 MiB) of its parent's, read before or after the child's, is taken for that same memory: an
    exact match is not enough, the parent's own threads move its figure between the reads (seen in CI:
    213 MB sampled as 426)."""
    todo, anon, file = [(pid, _rss_kb(pid))], 0, 0
    while todo:
        p, mine = todo.pop()
        anon, file = anon + mine[0], file + mine[1]
        for c in _children(p):
            shared = _shares_memory(p, c)
            theirs = _rss_kb(c)
            if shared is None:
                # anonymous memory only: file figures move as the child execs (it maps the same libraries)
                near = [m for m in (mine[0], _rss_kb(p)[0]) if abs(theirs[0] - m) <= max(1024, m // 100)]
                shared = theirs[0] > 0 and bool(near)
            if not shared:
                todo.append((c, theirs))
    return anon, file


@dataclass
class Peak:
    seconds: float
    anon_mb: float       # peak of the tree's summed anonymous memory (proportional set size)
    total_mb: float      # peak of the tree's summed anonymous + file memory (proportional set size)
    returncode: int


def run(cmd: list, *, log: Path | None = None, every: float = 0.02, env: dict | None = None) -> Peak:
    """Run ``cmd`` (output to ``log``, else discarded), sampling its process tree every ``every`` seconds."""
    t0 = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as out:
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})})
        anon = total = 0

        def poll() -> None:
            nonlocal anon, total
            while p.poll() is None:
                a, f = tree_rss_kb(p.pid)
                anon, total = max(anon, a), max(total, a + f)
                time.sleep(every)
        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = p.wait()
        th.join()
    return Peak(time.perf_counter() - t0, anon / 1024, total / 1024, rc)
