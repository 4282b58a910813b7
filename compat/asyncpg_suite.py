"""Run asyncpg's own test suite directly against PostgreSQL and through dbmux, and compare.

A test that passes directly but fails (or errors) through dbmux is a compatibility failure.
Tests that fail or are skipped directly are reported but never counted against dbmux.

    .venv/bin/python -m compat.asyncpg_suite                  # default module set
    .venv/bin/python -m compat.asyncpg_suite -m test_execute -m test_pool
    .venv/bin/python -m compat.asyncpg_suite -k "Prepare"     # pytest -k filter

Exit code: 0 when there are no compatibility failures, 1 when there are, 2 on setup errors.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

ASYNCPG_VERSION = "0.32.0"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/80/4e/"
    "59dc964f962f09e3ed472e5d2d3ba670a41a2be25080dc62ab3db507ff5e/asyncpg-0.32.0.tar.gz"
)
SDIST_SHA256 = "45e64e56714d888330b884aad1dfb363d0bf43fb343e3d1a8968525f3bade478"

COMPAT_DIR = Path(__file__).resolve().parent
CACHE_DIR = COMPAT_DIR / ".cache"

# Modules that are relevant to a proxy and run against an existing (unmanaged) cluster.
# test_connect is left out by default: most of it starts its own clusters or edits pg_hba;
# add it with -m test_connect (tests that fail directly are not counted anyway).
DEFAULT_MODULES = [
    "test_execute",
    "test_prepare",
    "test_transaction",
    "test_cursor",
    "test_copy",
    "test_codecs",
    "test_record",
    "test_exceptions",
    "test_cache_invalidation",
    "test_introspection",
    "test_timeout",
    "test_cancellation",
    "test_listeners",
    "test_types",
    "test_pool",
    "test_adversity",
]

PYTEST_INI = """\
[pytest]
addopts = -p no:cacheprovider
timeout = {timeout}
asyncio_mode = strict
"""

_RESULT_LINE = re.compile(r"^(\S+::\S+(?:::\S+)?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


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


def fetch_sdist(cache: Path) -> Path:
    """The unpacked asyncpg sdist in the cache, downloading and checking it when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    unpacked = cache / f"asyncpg-{ASYNCPG_VERSION}"
    if (unpacked / "tests").is_dir():
        return unpacked
    tarball = cache / f"asyncpg-{ASYNCPG_VERSION}.tar.gz"
    if not tarball.exists() or _sha256(tarball) != SDIST_SHA256:
        print(f"downloading {SDIST_URL}", file=sys.stderr)
        partial = tarball.with_suffix(".part")
        with urllib.request.urlopen(SDIST_URL, timeout=60) as response, partial.open("wb") as f:
            shutil.copyfileobj(response, f)
        digest = _sha256(partial)
        if digest != SDIST_SHA256:
            partial.unlink()
            raise SystemExit(f"sha256 mismatch for the asyncpg sdist: {digest}")
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


def check_installed_asyncpg() -> None:
    import asyncpg

    if asyncpg.__version__ != ASYNCPG_VERSION:
        print(
            f"warning: installed asyncpg is {asyncpg.__version__}, "
            f"the test suite is from {ASYNCPG_VERSION}",
            file=sys.stderr,
        )
    if not (Path(asyncpg.__file__).parent / "_testbase").is_dir():
        raise SystemExit(
            "the installed asyncpg has no asyncpg._testbase; this harness needs a wheel "
            "that ships it (asyncpg 0.32.0 wheels do)"
        )


# --------------------------------------------------------------------------- running


def make_workdir(sdist: Path, timeout: int) -> Path:
    """A temp dir holding only the sdist's tests/ package and a pytest.ini.

    There is no asyncpg/ folder in it, so the tests import the installed (compiled) asyncpg,
    and its asyncpg._testbase, which the wheel ships.
    """
    work = Path(tempfile.mkdtemp(prefix="dbmux-compat-"))
    shutil.copytree(sdist / "tests", work / "tests")
    (work / "pytest.ini").write_text(PYTEST_INI.format(timeout=timeout))
    return work


def run_suite(
    label: str,
    port: int,
    password: str,
    work: Path,
    modules: list[str],
    keyword: str | None,
    total_hint: int | None,
) -> Run:
    run = Run(label, port)
    junit = work / f"junit-{label}.xml"
    log = work / f"pytest-{label}.log"
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("PG"):
            del env[name]
    env.update(
        PGHOST="127.0.0.1",
        PGPORT=str(port),
        PGUSER="postgres",
        PGPASSWORD=password,
        PGDATABASE="postgres",
        PYTHONDONTWRITEBYTECODE="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(work / "pytest.ini"),
        "--rootdir",
        str(work),
        "-v",
        "--color=no",
        f"--junitxml={junit}",
        *[f"tests/{m}.py" for m in modules],
    ]
    if keyword:
        cmd += ["-k", keyword]
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


def count_tests(work: Path, modules: list[str], keyword: str | None) -> int | None:
    cmd = [sys.executable, "-m", "pytest", "-c", str(work / "pytest.ini"), "--rootdir"]
    cmd += [str(work), "--collect-only", "-q", *[f"tests/{m}.py" for m in modules]]
    if keyword:
        cmd += ["-k", keyword]
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True).stdout
    n = sum(1 for line in out.splitlines() if "::" in line)
    return n or None


# --------------------------------------------------------------------------- dbmux


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def dbmux_serve(host: str, port: int, password: str, work: Path, percent: int, log: Path):
    """`dbmux serve` in a child process in front of host:port; yields its port."""
    secret = work / "postgres-secret.json"
    secret.write_text(json.dumps({"username": "postgres", "password": password}))
    listen = free_port()
    config = {
        "proxies": [
            {
                "name": "compat",
                "engine_family": "POSTGRESQL",
                "listen": f"127.0.0.1:{listen}",
                "auth": [{"secret": f"file:{secret}"}],
                "target_group": {
                    "connection_pool_config": {"max_connections_percent": percent},
                    "targets": [{"host": host, "port": port}],
                },
            }
        ]
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
    failures = []
    newly_passing = []
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


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m compat.asyncpg_suite",
        description="Run asyncpg's own test suite directly against a throwaway PostgreSQL and "
        "then through dbmux (`dbmux serve` in a child process), and report the tests that "
        "pass directly but not through dbmux.",
    )
    parser.add_argument(
        "-m",
        "--module",
        action="append",
        dest="modules",
        metavar="NAME",
        help=f"asyncpg test module to run, repeatable (default: {' '.join(DEFAULT_MODULES)})",
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression to select tests")
    parser.add_argument(
        "--pool-percent",
        type=int,
        default=50,
        help="dbmux max_connections_percent of the cluster's max_connections (default: 50, "
        "so 50 server connections; asyncpg's pool tests open many connections at once)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=100,
        help="PostgreSQL max_connections (default: 100)",
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modules = args.modules or DEFAULT_MODULES
    started = time.monotonic()
    check_installed_asyncpg()
    sdist = fetch_sdist(CACHE_DIR)
    missing = [m for m in modules if not (sdist / "tests" / f"{m}.py").exists()]
    if missing:
        print(f"no such asyncpg test module(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    work = make_workdir(sdist, args.timeout)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dbmux_log = CACHE_DIR / f"asyncpg-{stamp}-dbmux.log"

    from dbmux.testing import PostgresCluster

    password = secrets.token_hex(12)
    try:
        with PostgresCluster(
            max_connections=args.max_connections,
            auth_method="scram-sha-256",
            password=password,
        ) as cluster:
            print(
                f"PostgreSQL on {cluster.host}:{cluster.port}; modules: {' '.join(modules)}",
                file=sys.stderr,
            )
            total = count_tests(work, modules, args.keyword)
            if args.via_only:
                direct = Run("direct", cluster.port)
            else:
                direct = run_suite(
                    "direct", cluster.port, password, work, modules, args.keyword, total
                )
            with dbmux_serve(
                cluster.host, cluster.port, password, work, args.pool_percent, dbmux_log
            ) as port:
                print(
                    f"dbmux serve on 127.0.0.1:{port} (pool: {args.pool_percent}% of "
                    f"{args.max_connections}); log {dbmux_log}",
                    file=sys.stderr,
                )
                via = run_suite("dbmux", port, password, work, modules, args.keyword, total)
    finally:
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    if args.via_only:
        direct.results = {t: Outcome("passed") for t in via.results}
    failures = report(direct, via, args.lines)
    elapsed = time.monotonic() - started
    out = CACHE_DIR / f"asyncpg-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "asyncpg": ASYNCPG_VERSION,
                "modules": modules,
                "keyword": args.keyword,
                "pool_percent": args.pool_percent,
                "max_connections": args.max_connections,
                "total_seconds": round(elapsed, 1),
                "direct": {
                    "seconds": round(direct.seconds, 1),
                    "counts": dict(direct.counts()),
                    "results": {k: asdict(v) for k, v in direct.results.items()},
                },
                "dbmux": {
                    "seconds": round(via.seconds, 1),
                    "counts": dict(via.counts()),
                    "results": {k: asdict(v) for k, v in via.results.items()},
                },
                "compatibility_failures": failures,
            },
            indent=2,
        )
    )
    print(f"\ntotal time {elapsed:.0f}s; details in {out}; dbmux log {dbmux_log}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
