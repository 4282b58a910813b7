"""py-spy around a dbmux run: record, summarise where the time goes, draw a flame graph.

py-spy writes one format per recording, so it records the raw (collapsed-stack) format,
which speedscope.app and flamegraph.pl read as they are, and this module draws the SVG itself.
Native frames (--native) are on: they show how much of the proxy's time is spent in
syscalls such as write() (on loopback, a send also runs the receiver's TCP stack) versus in
the interpreter. Idle samples (--idle) are kept so that busy time can be told from waiting.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A thread waiting for work (the executor's threads asyncio.to_thread started), wherever in
# libc the wait ends: idle too.
WAITING_FRAMES = {"_queue_SimpleQueue_get"}
IDLE_LEAVES = {
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "futex",
    "__futex_abstimed_wait_common",
    "__futex_abstimed_wait_common64",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "sem_wait",
    "sem_timedwait",
    "nanosleep",
    "clock_nanosleep",
    "__GI___clock_nanosleep",
}
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]+?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    return str(Path(sys.executable).parent / "py-spy")


def start(pid: int, output: Path, duration: int, *, native: bool = True) -> subprocess.Popen[str]:
    cmd = [py_spy(), "record", "--pid", str(pid), "--duration", str(duration)]
    cmd += ["--format", "raw", "--output", str(output), "--idle", "--rate", "100"]
    if native:
        cmd.append("--native")
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[bool, str]:
    """Wait for py-spy; (succeeded, its output)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return False, (out or "") + "\n(py-spy timed out)"
    return proc.returncode == 0, out or ""


# ------------------------------------------------------------------- perf (on-CPU time)


def perf_binary() -> str | None:
    return shutil.which("perf")


def start_perf(pid: int, output: Path, duration: int) -> subprocess.Popen[str] | None:
    """perf record of pid's on-CPU time (kernel included), if perf is installed."""
    perf = perf_binary()
    if perf is None:
        return None
    cmd = [perf, "record", "-F", "999", "-p", str(pid), "-o", str(output), "-q"]
    return subprocess.Popen(
        [*cmd, "--", "sleep", str(duration)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.+?)\s*$")
_PERF_DSO = re.compile(r"^\s*([\d.]+)%\s+(.+?)\s*$")


Shares = list[tuple[float, str]]


def perf_summary(data: Path, top: int = 15) -> tuple[Shares, Shares]:
    """(share by shared object, top symbols by self time) of a perf.data file."""
    perf = perf_binary()
    assert perf is not None
    base = [perf, "report", "-i", str(data), "--stdio", "-q", "--no-children"]
    by_dso = subprocess.run(
        [*base, "--sort", "dso"], capture_output=True, text=True, timeout=120
    ).stdout
    by_sym = subprocess.run(
        [*base, "--sort", "dso,sym"], capture_output=True, text=True, timeout=120
    ).stdout
    dsos = [(float(m[1]), m[2]) for m in map(_PERF_DSO.match, by_dso.splitlines()) if m]
    syms = []
    for line in by_sym.splitlines():
        m = _PERF_LINE.match(line)
        if m:
            where = "kernel" if m[3] == "k" else m[2]
            syms.append((float(m[1]), f"{m[4]}  [{where}]"))
    return dsos[:top], syms[:top]


def format_perf(dsos: Shares, syms: Shares) -> str:
    lines = ["  On-CPU time by shared object (perf, kernel included):"]
    lines += [f"    {share:5.1f}%  {name}" for share, name in dsos[:8]]
    lines += ["", f"  Top {len(syms)} symbols by on-CPU self time (perf):"]
    lines += [f"    {share:5.1f}%  {name}" for share, name in syms]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parsing


def read_stacks(raw: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _split(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    return (m.group("name"), m.group("file")) if m else (frame, "")


def is_python(frame: str) -> bool:
    _, file = _split(frame)
    return file.endswith(".py") or (file != "" and "." not in Path(file).name)  # the script


def label(frame: str) -> str:
    """The frame without its line number: 'PgClient.relay (dbmux/.../frontend.py)'."""
    name, file = _split(frame)
    return f"{name} ({file})" if file else name


@dataclass
class Summary:
    samples: int = 0
    idle: int = 0
    # Innermost Python function of each busy sample, with what it calls natively.
    python_self: Counter[str] = field(default_factory=Counter)
    # Leaf frame of each busy sample; native leaves name their Python caller.
    leaf_self: Counter[str] = field(default_factory=Counter)
    # Python functions anywhere on a busy stack (inclusive time).
    python_total: Counter[str] = field(default_factory=Counter)

    @property
    def busy(self) -> int:
        return self.samples - self.idle

    def to_json(self, top: int = 30) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "idle": self.idle,
            "python_self": self.python_self.most_common(top),
            "leaf_self": self.leaf_self.most_common(top),
            "python_total": self.python_total.most_common(top),
        }


def summarise(raw: Path) -> Summary:
    s = Summary()
    for frames, count in read_stacks(raw):
        s.samples += count
        leaf_name, _ = _split(frames[-1])
        if leaf_name in IDLE_LEAVES or any(_split(f)[0] in WAITING_FRAMES for f in frames):
            s.idle += count
            continue
        py = [f for f in frames if is_python(f)]
        caller = label(py[-1]) if py else "(no Python frame)"
        s.python_self[caller] += count
        if is_python(frames[-1]):
            s.leaf_self[label(frames[-1])] += count
        else:
            short = caller.split(" (")[0]
            s.leaf_self[f"{label(frames[-1])}  <- {short}"] += count
        for name in {label(f) for f in py}:
            s.python_total[name] += count
    return s


def format_summary(s: Summary, top: int = 15) -> str:
    if s.samples == 0:
        return "  (no samples)"
    busy = max(s.busy, 1)
    lines = [
        f"  py-spy: {s.samples} samples at 100 Hz of wall-clock time; busy (running or waiting "
        f"for a CPU) {100 * s.busy / s.samples:.1f}%, "
        f"idle in epoll {100 * s.idle / s.samples:.1f}%; shares below are of busy time",
        "",
        f"  Top {top} by own time, innermost Python function (incl. the C/syscalls it calls):",
    ]
    lines += [f"    {100 * n / busy:5.1f}%  {name}" for name, n in s.python_self.most_common(top)]
    lines += ["", f"  Top {top} by own time, leaf frame (native leaves show their Python caller):"]
    lines += [f"    {100 * n / busy:5.1f}%  {name}" for name, n in s.leaf_self.most_common(top)]
    lines += ["", f"  Top {top} Python functions by total time (minus the trunk every sample has):"]
    below_trunk = [(k, n) for k, n in s.python_total.most_common() if n < s.busy]
    lines += [f"    {100 * n / busy:5.1f}%  {name}" for name, n in below_trunk[:top]]
    return "\n".join(lines)


# ------------------------------------------------------------------------ flame graph


@dataclass
class _Node:
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def _colour(frame: str) -> str:
    name, file = _split(frame)
    if name in IDLE_LEAVES:
        return "#c8c8c8"
    if file.startswith("dbmux") or "/dbmux/" in file:
        return "#f28e2b"  # our code
    if is_python(frame):
        return "#edc948"  # stdlib / other Python
    if ".so" in file:
        return "#e15759"  # libc, libpython: syscalls and the interpreter
    return "#76b7b2"  # compiled extensions (uvloop, _asyncio, ...)


def render_svg(raw: Path, svg: Path, title: str, width: int = 1400) -> None:
    """An icicle graph (root on top) of the collapsed stacks, with a tooltip per frame."""
    root = _Node()
    for frames, count in read_stacks(raw):
        root.count += count
        node = root
        for frame in frames:
            node = node.children.setdefault(frame, _Node())
            node.count += count
    total = max(root.count, 1)
    row, top = 16, 40
    rects: list[str] = []
    depth_max = 0

    def walk(node: _Node, x: float, depth: int) -> None:
        nonlocal depth_max
        for frame, child in sorted(node.children.items()):
            w = child.count * (width - 20) / total
            if w >= 0.3:
                depth_max = max(depth_max, depth)
                y = top + depth * row
                tip = html.escape(
                    f"{frame}: {child.count} samples ({100 * child.count / total:.2f}%)"
                )
                text = html.escape(frame[: int(w / 7)]) if w > 21 else ""
                rects.append(
                    f'<g><title>{tip}</title><rect x="{10 + x:.1f}" y="{y}" width="{w:.1f}" '
                    f'height="{row - 1}" fill="{_colour(frame)}" rx="2"/>'
                    f'<text x="{13 + x:.1f}" y="{y + 12}">{text}</text></g>'
                )
                walk(child, x, depth + 1)
            x += w

    walk(root, 0.0, 0)
    height = top + (depth_max + 2) * row
    svg.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace" font-size="11">\n'
        f'<text x="10" y="22" font-size="15">{html.escape(title)} ({total} samples; '
        "orange: dbmux, yellow: Python, red: libc/libpython, teal: extensions, grey: idle)"
        "</text>\n" + "\n".join(rects) + "\n</svg>\n"
    )
