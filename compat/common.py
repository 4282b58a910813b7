"""What every compat suite shares: a pinned sdist, a pytest run read back from its junit XML,
`dbmux serve` in a child process, and the comparison of a direct run with one through dbmux.

A test that passes directly but fails (or errors) through dbmux is a compatibility failure.
Tests that fail or are skipped directly are reported but never counted against dbmux.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

COMPAT_DIR = Path(__file__).resolve().parent
CACHE_DIR = COMPAT_DIR / ".cache"

PYTEST_INI = """\
[pytest]
addopts = -p no:cacheprovider
timeout = {timeout}
asyncio_mode = strict
"""

_RESULT_LINE = re.compile(r"^(\S+::\S+(?:::\S+)?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


@dataclass(frozen=True)
class Sdist:
    """A driver's source distribution on PyPI, pinned by version and sha256."""

    name: str
    version: str
    url: str
    sha256: str

    @property
    def stem(self) -> str:
        return f"{self.name}-{self.version}"


@dataclass
class Outcome:
    outcome: str  # passed | failed | error | skipped
    message: str = ""
    seconds: float = 0.0


@dataclass
class Run:
    label: str
    port: int
    seconds: float = 0.0
    returncode: int = 0
    results: dict[str, Outcome] = field(default_factory=dict)

    def counts(self) -> Counter[str]:
        return Counter(o.outcome for o in self.results.values())


# --------------------------------------------------------------------------- sdist


def fetch_sdist(sdist: Sdist, cache: Path = CACHE_DIR) -> Path:
    """The unpacked sdist in the cache, downloading and checking it when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    unpacked = cache / sdist.stem
    if (unpacked / "tests").is_dir():
        return unpacked
    tarball = cache / f"{sdist.stem}.tar.gz"
    if not tarball.exists() or _sha256(tarball) != sdist.sha256:
        print(f"downloading {sdist.url}", file=sys.stderr)
        partial = tarball.with_suffix(".part")
        with urllib.request.urlopen(sdist.url, timeout=60) as response, partial.open("wb") as f:
            shutil.copyfileobj(response, f)
        digest = _sha256(partial)
        if digest != sdist.sha256:
            partial.unlink()
            raise SystemExit(f"sha256 mismatch for the {sdist.name} sdist: {digest}")
        partial.replace(tarball)
    with tarfile.open(tarball) as tar:
        tar.extractall(cache, filter="data")
    return unpacked


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_workdir(sdist: Path, timeout: int) -> Path:
    """A temp dir holding only the sdist's tests/ package and a pytest.ini.

    There is no driver package in it, so the tests import the installed driver.
    """
    work = Path(tempfile.mkdtemp(prefix="dbmux-compat-"))
    shutil.copytree(sdist / "tests", work / "tests")
    (work / "pytest.ini").write_text(PYTEST_INI.format(timeout=timeout))
    return work


def clean_env(drop_prefix: str, **values: str) -> dict[str, str]:
    """This process's environment without the driver's own variables, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefix)}
    env.update(values, PYTHONDONTWRITEBYTECODE="1")
    return env


# --------------------------------------------------------------------------- running


def _pytest_command(work: Path, args: list[str], keyword: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-c", str(work / "pytest.ini"), "--rootdir", str(work)]
    cmd += args
    if keyword:
        cmd += ["-k", keyword]
    return cmd


def run_suite(
    label: str,
    port: int,
    env: dict[str, str],
    work: Path,
    args: list[str],
    keyword: str | None,
    total_hint: int | None,
) -> Run:
    """pytest with `args` (test paths and the suite's own options) in `work`, with a live
    count on stderr; the outcome of every test read from its junit XML."""
    run = Run(label, port)
    junit = work / f"junit-{label}.xml"
    log = work / f"pytest-{label}.log"
    cmd = _pytest_command(work, ["-v", "--color=no", f"--junitxml={junit}", *args], keyword)
    started = time.monotonic()
    seen: Counter[str] = Counter()
    tty = sys.stderr.isatty()
    with log.open("w", buffering=1) as out:
        proc = subprocess.Popen(
            cmd,
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            m = _RESULT_LINE.match(line)
            if not m:
                continue
            seen[m.group(2)] += 1
            done = sum(seen.values())
            of = f"/{total_hint}" if total_hint else ""
            status = (
                f"[{label:6}] {done}{of} tests  {seen['PASSED']} passed  "
                f"{seen['FAILED'] + seen['ERROR']} failed  {seen['SKIPPED']} skipped  "
                f"{time.monotonic() - started:5.0f}s  {m.group(1)[:60]}"
            )
            if tty:
                print(f"\r\x1b[K{status}", end="", file=sys.stderr, flush=True)
            elif done % 50 == 0:
                print(status, file=sys.stderr, flush=True)
        run.returncode = proc.wait()
    if tty:
        print(file=sys.stderr)
    run.seconds = time.monotonic() - started
    if not junit.exists():
        raise SystemExit(f"pytest ({label}) wrote no junit xml; see {log}:\n{log.read_text()}")
    run.results = parse_junit(junit)
    c = run.counts()
    print(
        f"[{label:6}] done: {len(run.results)} tests, {c['passed']} passed, {c['failed']} "
        f"failed, {c['error']} errors, {c['skipped']} skipped in {run.seconds:.0f}s "
        f"(pytest exit {run.returncode})",
        file=sys.stderr,
    )
    return run


def parse_junit(path: Path) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        test_id = f"{classname}::{case.get('name', '')}".removeprefix("tests.")
        seconds = float(case.get("time", "0") or 0)
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "") + "\n" + (node.text or "")
                break
        # A test can both fail and error (errors in teardown): keep the worst.
        prior = results.get(test_id)
        if prior is not None and prior.outcome in ("failed", "error"):
            continue
        results[test_id] = Outcome(outcome, message.strip(), seconds)
    return results


def count_tests(
    work: Path, args: list[str], keyword: str | None, env: dict[str, str]
) -> int | None:
    cmd = _pytest_command(work, ["--collect-only", "-q", *args], keyword)
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True).stdout
    n = sum(1 for line in out.splitlines() if "::" in line)
    return n or None


# --------------------------------------------------------------------------- dbmux


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def dbmux_serve(
    engine_family: str,
    host: str,
    port: int,
    users: dict[str, str],
    work: Path,
    percent: int,
    log: Path,
) -> Iterator[int]:
    """`dbmux serve` in a child process in front of host:port, with a secret for each of
    `users` (name -> password); yields its port."""
    auth = []
    for user, password in users.items():
        secret = work / f"{user}-secret.json"
        secret.write_text(json.dumps({"username": user, "password": password}))
        auth.append({"secret": f"file:{secret}"})
    listen = free_port()
    config = {
        "admin": {"listen": "127.0.0.1:0"},  # a free port: runs side by side never clash
        "proxies": [
            {
                "name": "compat",
                "engine_family": engine_family,
                "listen": f"127.0.0.1:{listen}",
                "auth": auth,
                "target_group": {
                    "connection_pool_config": {"max_connections_percent": percent},
                    "targets": [{"host": host, "port": port}],
                },
            }
        ],
    }
    path = work / "dbmux.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    dbmux = Path(sys.executable).with_name("dbmux")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(dbmux), "serve", "--config", str(path), "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"dbmux serve did not start:\n{log.read_text()}") from None
                time.sleep(0.05)
        yield listen
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- report


def first_lines(message: str, n: int) -> list[str]:
    lines = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
    # Prefer the exception line(s) pytest marks with "E   ".
    marked = [ln for ln in lines if ln.startswith("E ")]
    # asyncpg appends a long pgbouncer HINT to prepared statement errors: cut it.
    for i, ln in enumerate(marked):
        if ln.removeprefix("E").strip().startswith("HINT:"):
            marked = marked[:i]
            break
    return (marked or lines)[:n]


def report(direct: Run, via: Run, lines: int) -> list[dict[str, object]]:
    """Print the counts side by side and the tests that pass directly but not via dbmux;
    return those."""
    failures = []
    newly_passing = []
    skipped_via = []  # skipped or xfailed only through dbmux: not counted, but listed
    for test_id, d in sorted(direct.results.items()):
        v = via.results.get(test_id)
        if d.outcome == "passed" and (v is None or v.outcome in ("failed", "error")):
            failures.append(
                {
                    "test": test_id,
                    "via_outcome": v.outcome if v else "missing",
                    "message": v.message if v else "",
                }
            )
        if d.outcome != "passed" and v is not None and v.outcome == "passed":
            newly_passing.append(test_id)
        if d.outcome == "passed" and v is not None and v.outcome == "skipped":
            skipped_via.append(test_id)

    print()
    print(f"{'':28}{'direct':>10}{'via dbmux':>12}")
    dc, vc = direct.counts(), via.counts()
    for key in ("passed", "failed", "error", "skipped"):
        print(f"  {key:26}{dc[key]:>10}{vc[key]:>12}")
    print(f"  {'total':26}{len(direct.results):>10}{len(via.results):>12}")
    print(f"  {'seconds':26}{direct.seconds:>10.0f}{via.seconds:>12.0f}")
    not_counted = [t for t, o in direct.results.items() if o.outcome in ("failed", "error")]
    if not_counted:
        print(f"\n{len(not_counted)} test(s) fail directly and are not counted:")
        for t in sorted(not_counted):
            print(f"  - {t}: {' | '.join(first_lines(direct.results[t].message, 1))}")
    if newly_passing:
        print(f"\n{len(newly_passing)} test(s) fail directly but pass via dbmux: {newly_passing}")
    if skipped_via:
        print(f"\n{len(skipped_via)} test(s) pass directly but skip or xfail via dbmux:")
        for t in skipped_via:
            print(f"  - {t}: {' | '.join(first_lines(via.results[t].message, 1))}")
    print()
    if failures:
        print(f"COMPATIBILITY FAILURES: {len(failures)} test(s) pass directly, not via dbmux")
        for f in failures:
            print(f"  x {f['test']} [{f['via_outcome']}]")
            for ln in first_lines(str(f["message"]), lines):
                print(f"      {ln[:200]}")
    else:
        print("no compatibility failures: every test that passes directly passes via dbmux")
    return failures


def write_results(
    path: Path,
    settings: dict[str, object],
    direct: Run,
    via: Run,
    failures: list[dict[str, object]],
    elapsed: float,
) -> None:
    """Every test's outcome and full message of both runs, as JSON."""
    runs = {
        run.label: {
            "seconds": round(run.seconds, 1),
            "counts": dict(run.counts()),
            "results": {k: asdict(v) for k, v in run.results.items()},
        }
        for run in (direct, via)
    }
    body = {**settings, "total_seconds": round(elapsed, 1), **runs}
    body["compatibility_failures"] = failures
    path.write_text(json.dumps(body, indent=2))


# --------------------------------------------------------------------------- one driver


class Database(Protocol):
    """What a throwaway server gives the harness (dbmux.testing's servers have both)."""

    host: str
    port: int


@dataclass(frozen=True)
class Suite:
    """One driver's test suite: how to fetch it, serve it a database, and run it."""

    sdist: Sdist
    engine_family: str  # dbmux's engine_family
    default_modules: list[str]
    about_modules: str  # why the default set is what it is, for --help
    # (work dir, max_connections, password) -> a started throwaway server
    start_server: Callable[[Path, int, str], AbstractContextManager[Database]]
    users: Callable[[str], dict[str, str]]  # password -> the users the suite logs in as
    env: Callable[[int, str], dict[str, str]]  # (port, password) -> the suite's environment
    pytest_args: Callable[[list[str], int], list[str]]  # (modules, port) -> pytest arguments
    check_installed: Callable[[], None]
    prepare: Callable[[Path], None] = lambda work: None  # adapt the copied tests/


def parse_args(suite: Suite, argv: list[str] | None) -> argparse.Namespace:
    name = suite.sdist.name
    parser = argparse.ArgumentParser(
        prog=f"python -m compat.{name}_suite",
        description=f"Run {name}'s own test suite directly against a throwaway database and "
        "then through dbmux (`dbmux serve` in a child process), and report the tests that "
        "pass directly but not through dbmux.",
    )
    parser.add_argument(
        "-m",
        "--module",
        action="append",
        dest="modules",
        metavar="NAME",
        help=f"{name} test module to run, repeatable (default: "
        f"{' '.join(suite.default_modules)}). {suite.about_modules}",
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression to select tests")
    parser.add_argument(
        "--pool-percent",
        type=int,
        default=50,
        help="dbmux max_connections_percent of the database's max_connections (default: 50, "
        "so 50 server connections; pool tests open many connections at once)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=100,
        help="the database's max_connections (default: 100)",
    )
    parser.add_argument(
        "--timeout", type=int, default=120, help="per-test timeout in seconds (default: 120)"
    )
    parser.add_argument(
        "--lines", type=int, default=3, help="failure message lines to print (default: 3)"
    )
    parser.add_argument(
        "--via-only",
        action="store_true",
        help="skip the direct run (every test is compared as if it passed directly)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp work dir")
    return parser.parse_args(argv)


def compare(suite: Suite, argv: list[str] | None = None) -> int:
    """Run the suite directly, then through dbmux, and report; the process's exit code:
    0 without compatibility failures, 1 with, 2 on a setup error."""
    args = parse_args(suite, argv)
    name = suite.sdist.name
    modules = args.modules or suite.default_modules
    started = time.monotonic()
    suite.check_installed()
    sdist = fetch_sdist(suite.sdist)
    missing = [m for m in modules if not (sdist / "tests" / f"{m}.py").exists()]
    if missing:
        print(f"no such {name} test module(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    work = make_workdir(sdist, args.timeout)
    suite.prepare(work)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dbmux_log = CACHE_DIR / f"{name}-{stamp}-dbmux.log"
    password = secrets.token_hex(12)
    try:
        with suite.start_server(work, args.max_connections, password) as db:
            print(f"database on {db.host}:{db.port}; modules: {' '.join(modules)}", file=sys.stderr)
            env = suite.env(db.port, password)
            tests = suite.pytest_args(modules, db.port)
            total = count_tests(work, tests, args.keyword, env)
            if args.via_only:
                direct = Run("direct", db.port)
            else:
                direct = run_suite("direct", db.port, env, work, tests, args.keyword, total)
            users = suite.users(password)
            with dbmux_serve(
                suite.engine_family, db.host, db.port, users, work, args.pool_percent, dbmux_log
            ) as port:
                print(
                    f"dbmux serve on 127.0.0.1:{port} (pool: {args.pool_percent}% of "
                    f"{args.max_connections}); log {dbmux_log}",
                    file=sys.stderr,
                )
                env = suite.env(port, password)
                tests = suite.pytest_args(modules, port)
                via = run_suite("dbmux", port, env, work, tests, args.keyword, total)
    finally:
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    if args.via_only:
        direct.results = {t: Outcome("passed") for t in via.results}
    failures = report(direct, via, args.lines)
    elapsed = time.monotonic() - started
    out = CACHE_DIR / f"{name}-{stamp}.json"
    settings = {
        name: suite.sdist.version,
        "modules": modules,
        "keyword": args.keyword,
        "pool_percent": args.pool_percent,
        "max_connections": args.max_connections,
    }
    write_results(out, settings, direct, via, failures, elapsed)
    print(f"\ntotal time {elapsed:.0f}s; details in {out}; dbmux log {dbmux_log}")
    return 1 if failures else 0
