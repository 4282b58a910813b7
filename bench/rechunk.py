"""The driver scenarios of the re-chunking loop tests with many random seeds: every write cut
at random points and delayed on both sides of dbmux (dbmux.testing.rechunk), each iteration with a
deadline, so a hang that one seed in fifty shows is found and its seed printed.

Each run is a fresh seed, a fresh dbmux (a pool of two, so shared statements are often
missing on the connection a client gets) and both relays, for each scenario in turn; the
servers are one throwaway PostgreSQL and one MariaDB for the whole bench. See bench/README.md.

    python -m bench.rechunk [--runs 20] [--iterations 50] [--only SCENARIO,..] [--seed S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.runner import out
from dbmux.testing import MariaDBServer, PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from dbmux.testing.rechunk import Rechunker
from dbmux.testing.scenarios import (
    BY_NAME,
    POSTGRESQL,
    SCENARIOS,
    Endpoint,
    Scenario,
    ScenarioFailed,
    run_many,
)

USER, PASSWORD, DATABASE = "app", "app-secret", "app"
RUNS = 20
ITERATIONS = 50
DEADLINE = 15.0  # seconds for one iteration; a normal one takes well under a second
POOL_OF_TWO = {"max_connections_percent": 4}  # of max_connections 50
PROGRESS_EVERY = 1.0  # seconds between progress lines when stdout is not a terminal


@dataclass
class Tally:
    """One scenario's runs: how many, how many iterations, and each failure's seed and why."""

    runs: int = 0
    iterations: int = 0
    seconds: float = 0.0
    failures: list[tuple[int, str]] = field(default_factory=list)  # (seed, message)


class Progress:
    """One line, rewritten in place on a terminal, printed every second otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.last = 0.0

    def show(self, line: str, force: bool = False) -> None:
        if self.tty:
            sys.stdout.write("\r" + line[:160].ljust(100))
            sys.stdout.flush()
        elif force or time.monotonic() - self.last >= PROGRESS_EVERY:
            out(line)
            self.last = time.monotonic()

    def end(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


@contextlib.contextmanager
def servers() -> Iterator[dict[str, tuple[str, int]]]:
    """A throwaway PostgreSQL and MariaDB with the scenarios' user and database:
    engine family -> (host, port)."""
    with PostgresCluster() as pg, MariaDBServer() as mariadb:
        pg.create_user(USER, PASSWORD)
        pg.create_database(DATABASE, owner=USER)
        mariadb.create_user(USER, PASSWORD)
        mariadb.create_database(DATABASE, owner=USER)
        yield {POSTGRESQL: (pg.host, pg.port), "MYSQL": (mariadb.host, mariadb.port)}


def dbmux_config(engine: str, host: str, port: int, secrets_dir: Path) -> dict[str, Any]:
    secret = secrets_dir / "secret.json"
    secret.write_text(json.dumps({"username": USER, "password": PASSWORD}))
    return {
        "state_dir": str(secrets_dir),  # MySQL's RSA key: throwaway, not the user's
        "proxies": [
            {
                "name": "rechunk",
                "engine_family": engine,
                "listen": "127.0.0.1:0",
                "auth": [{"secret": f"file:{secret}"}],
                "target_group": {
                    "connection_pool_config": POOL_OF_TWO,
                    "targets": [{"host": host, "port": port}],
                },
            }
        ],
    }


@contextlib.contextmanager
def rechunked_dbmux(
    engine: str, server: tuple[str, int], seed: int, secrets_dir: Path
) -> Iterator[Rechunker]:
    """driver -> relay -> dbmux -> relay -> server, all cut by `seed`; yields the client side."""
    with contextlib.ExitStack() as stack:
        server_side = stack.enter_context(Rechunker(*server, seed=seed, name="server"))
        config = dbmux_config(engine, server_side.host, server_side.port, secrets_dir)
        embedded = stack.enter_context(EmbeddedDbmux(config))
        yield stack.enter_context(Rechunker(*embedded.address(), seed=seed, name="client"))


def run_scenario(
    scenario: Scenario,
    seed: int,
    server: tuple[str, int],
    args: argparse.Namespace,
    progress: Progress,
    tally: Tally,
    secrets_dir: Path,
) -> None:
    """One run: a fresh rechunked dbmux and `args.iterations` iterations, counted in `tally`."""
    failed = len(tally.failures)
    prefix = f"seed {seed} {scenario.name} (failures so far: {failed})"
    with rechunked_dbmux(scenario.engine, server, seed, secrets_dir) as relay:
        endpoint = Endpoint(relay.host, relay.port, USER, PASSWORD, DATABASE)
        loop = run_many(
            scenario,
            endpoint,
            relay,
            args.iterations,
            args.deadline,
            lambda done: progress.show(f"{prefix} {done}/{args.iterations}"),
        )
        try:
            tally.seconds += asyncio.run(loop)
            tally.iterations += args.iterations
        except ScenarioFailed as failure:
            progress.end()
            out(f"FAILED {failure}")
            tally.iterations += failure.iteration + 1
            tally.failures.append((seed, str(failure)))
    tally.runs += 1


def run_all(args: argparse.Namespace, scenarios: list[Scenario]) -> dict[str, Tally]:
    tallies = {s.name: Tally() for s in scenarios}
    progress = Progress()
    seeds = random.Random(args.seed)
    with servers() as addresses, tempfile.TemporaryDirectory(prefix="rechunk-") as tmp:
        for run in range(args.runs):
            # --seed is the first run's seed, so a failing seed printed below reproduces with
            # --seed S --runs 1.
            seed = args.seed if run == 0 and args.seed is not None else seeds.randrange(1 << 31)
            progress.show(f"run {run + 1}/{args.runs} seed {seed}", force=True)
            for scenario in scenarios:
                server = addresses[scenario.engine]
                run_scenario(
                    scenario, seed, server, args, progress, tallies[scenario.name], Path(tmp)
                )
        progress.end()
    return tallies


def report(tallies: dict[str, Tally], args: argparse.Namespace) -> list[str]:
    lines = [
        "",
        f"{'scenario':34} {'runs':>5} {'iterations':>11} {'failures':>9} {'s/iteration':>12}",
    ]
    for name, t in tallies.items():
        per = f"{t.seconds / t.iterations:.3f}" if t.iterations else "-"
        lines.append(f"{name:34} {t.runs:>5} {t.iterations:>11} {len(t.failures):>9} {per:>12}")
    for name, t in tallies.items():
        for seed, message in t.failures:
            lines.append(f"  {message}")
            lines.append(
                f"    reproduce: python -m bench.rechunk --only {name} --seed {seed} --runs 1 "
                f"--iterations {args.iterations}"
            )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rechunk",
        description="Driver scenarios through dbmux with every write cut and delayed at random "
        "(re-chunking relays on both sides), with many random seeds.",
    )
    parser.add_argument("--runs", type=int, default=RUNS, help=f"seeds to try (default: {RUNS})")
    parser.add_argument(
        "--iterations",
        type=int,
        default=ITERATIONS,
        help=f"iterations of each scenario per run (default: {ITERATIONS})",
    )
    parser.add_argument(
        "--only",
        default=",".join(BY_NAME),
        metavar="SCENARIO[,..]",
        help=f"scenarios to run (default: all): {', '.join(BY_NAME)}",
    )
    parser.add_argument(
        "--seed", type=int, help="the first run's seed (the others follow from it); default: random"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=DEADLINE,
        help=f"seconds an iteration may take before it counts as hung (default: {DEADLINE:g})",
    )
    args = parser.parse_args(argv)
    args.scenarios = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.scenarios if n not in BY_NAME]
    if unknown or not args.scenarios:
        parser.error(f"--only takes {', '.join(BY_NAME)}")
    if args.runs < 1 or args.iterations < 1:
        parser.error("--runs and --iterations must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [s for s in SCENARIOS if s.name in args.scenarios]
    out(
        f"rechunk: {args.runs} runs x {args.iterations} iterations of "
        f"{', '.join(s.name for s in scenarios)}"
    )
    started = time.monotonic()
    try:
        tallies = run_all(args, scenarios)
    except KeyboardInterrupt:
        out("\ninterrupted")
        return 130
    for line in report(tallies, args):
        out(line)
    out(f"({time.monotonic() - started:.0f}s in all)")
    return 1 if any(t.failures for t in tallies.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
