"""`make fuzz`: each engine's harness under atheris for FUZZ_RUNS inputs (default 1,000,000),
then the corpus minimized back into bench/fuzz/corpus and the line coverage it reaches in the
parsers' modules, measured with coverage.py.

    .venv/bin/python -m bench.fuzz                      # both engines, 1,000,000 inputs each
    .venv/bin/python -m bench.fuzz --runs 100000 --engines mysql
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.fuzz import live, logged, replay

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
ENGINES = ("postgres", "mysql")
# The modules each harness is aimed at; coverage is reported for these.
TARGETS = {
    "postgres": (
        "src/dbmux/engines/postgres/wire.py",
        "src/dbmux/engines/postgres/pinning.py",
        "src/dbmux/auth/scram.py",
    ),
    "mysql": (
        "src/dbmux/engines/mysql/wire.py",
        "src/dbmux/engines/mysql/pinning.py",
        "src/dbmux/engines/mysql/lexer.py",
        "src/dbmux/engines/mysql/kill.py",
        "src/dbmux/auth/mysql.py",
    ),
}
MAX_CORPUS_FILES = 150  # per engine: make test replays them all in a few seconds
MAX_LEN = 512
STATUS = re.compile(rb"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def fuzz(engine: str, runs: int, work: Path) -> dict[str, object]:
    """Run the engine's harness; a crash or a hang (10 s per input) fails the run."""
    corpus = work / "corpus"
    shutil.copytree(HERE / "corpus" / engine, corpus)
    log = work / "fuzz.log"
    started = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.call(
            [
                sys.executable, "-m", "bench.fuzz.worker", engine,
                f"-runs={runs}", f"-max_len={MAX_LEN}", "-timeout=10", "-rss_limit_mb=2048",
                "-print_final_stats=1", f"-artifact_prefix={work}/", str(corpus),
            ],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=_env(),
        )  # fmt: skip
    seconds = time.monotonic() - started
    text = log.read_bytes()
    statuses = STATUS.findall(text)
    stats = dict(re.findall(rb"stat::(\w+):\s+(\d+)", text))
    executed = int(stats.get(b"number_of_executed_units", 0))
    findings = sorted(p.name for p in work.iterdir() if p.name.startswith(("crash-", "timeout-")))
    return {
        "engine": engine,
        "exit": code,
        "inputs": executed,
        "seconds": round(seconds),
        "exec_per_s": round(executed / seconds) if seconds else 0,
        "cov": int(statuses[-1][1]) if statuses else 0,
        "ft": int(statuses[-1][2]) if statuses else 0,
        "crashes": len([f for f in findings if f.startswith("crash-")]),
        "hangs": len([f for f in findings if f.startswith("timeout-")]),
        "findings": [str(work / f) for f in findings],
        "log": str(log),
    }


def keep_corpus(engine: str, work: Path) -> int:
    """Put the run's corpus, minimized, in bench/fuzz/corpus."""
    kept = replay.minimize(engine, list((work / "corpus").iterdir()), MAX_CORPUS_FILES)
    target = HERE / "corpus" / engine
    shutil.rmtree(target)
    target.mkdir()
    for path in kept:
        shutil.copy(path, target / path.name)
    return len(kept)


def line_coverage(engine: str, work: Path) -> dict[str, float]:
    """Line coverage of the engine's target modules over the committed corpus."""
    data = work / ".coverage"
    env = {**_env(), "COVERAGE_FILE": str(data)}
    include = ",".join(TARGETS[engine])
    subprocess.run(
        [sys.executable, "-m", "coverage", "run", f"--include={include}", "-m",
         "bench.fuzz.replay", engine],
        cwd=ROOT, env=env, check=True,
    )  # fmt: skip
    report = work / "coverage.json"
    subprocess.run(
        [sys.executable, "-m", "coverage", "json", "-q", "-o", str(report)],
        cwd=ROOT, env=env, check=True,
    )  # fmt: skip
    files = json.loads(report.read_text())["files"]
    return {name: round(files[name]["summary"]["percent_covered"], 1) for name in sorted(files)}


def bystander(engine: str) -> dict[str, object]:
    """The corpus from hostile clients against dbmux on a throwaway server, a bystander's
    transactions counted (bench/fuzz/live.py); the proxy's own log must show no exception."""
    inputs = [path.read_bytes() for path in sorted((HERE / "corpus" / engine).iterdir())]
    tally = live.run_on_throwaway_server(engine, inputs)
    logged.assert_nothing_logged()
    return {
        "hostile_sessions": tally.sessions,
        "answered": tally.answered,
        "refused_and_closed": tally.closed,
        "hung_sessions": len(tally.hung),
        "bystander_transactions": tally.transactions[-1] if tally.transactions else 0,
    }


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}"}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz")
    parser.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", 1_000_000)))
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args()
    failed = False
    for engine in args.engines.split(","):
        with tempfile.TemporaryDirectory(prefix=f"dbmux-fuzz-{engine}-") as tmp:
            work = Path(tmp)
            result = fuzz(engine, args.runs, work)
            if result["exit"] or result["crashes"] or result["hangs"]:
                failed = True
                keep = Path(tempfile.mkdtemp(prefix=f"dbmux-fuzz-{engine}-findings-"))
                shutil.copytree(work, keep, dirs_exist_ok=True)
                result["kept"] = str(keep)
            else:
                result["corpus_files"] = keep_corpus(engine, work)
                result["line_coverage_percent"] = line_coverage(engine, work)
                result["bystander"] = bystander(engine)
                failed = failed or bool(result["bystander"]["hung_sessions"])
            print(json.dumps(result, indent=2), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
