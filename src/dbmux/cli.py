"""Command line: dbmux serve | check-config | describe | token | token-key | rsa-public-key |
demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Protocol

from dbmux import __version__
from dbmux.auth.mysql import RsaKeyError
from dbmux.auth.secrets import SecretError
from dbmux.auth.tls import TlsError
from dbmux.auth.tokens import (
    DEFAULT_LIFETIME,
    TokenKeyError,
    TokenVerifier,
    generate_auth_token,
    write_key_pair,
)
from dbmux.config import Config, ConfigError, load_config
from dbmux.eventloop import run
from dbmux.logs import LOG_FORMATS, setup_logging

log = logging.getLogger("dbmux")


class Servable(Protocol):
    """What `dbmux serve` runs: one Process, a Supervisor of workers, or one worker."""

    config: Config

    async def start(self) -> None: ...
    async def drain(self) -> Any: ...
    async def stop(self) -> None: ...
    async def reload(self) -> Any: ...
    def describe(self) -> str: ...


async def _serve(args: argparse.Namespace, config: Config | None) -> int:
    """Serve until SIGTERM or SIGINT, then drain (a second one stops at once); SIGHUP
    reloads the config file. With several workers, this is their supervisor; `config` is
    None in a worker, which takes its supervisor's."""
    stop = asyncio.Event()
    server: Servable
    if config is not None and config.worker_count > 1:
        from dbmux.workers.supervisor import Supervisor

        log_args = ("--log-level", args.log_level, "--log-format", args.log_format)
        server = Supervisor(config, args.config, log_args=log_args)
        await server.start()
        return await _ready(server, stop)
    from dbmux.proxy import Process

    if config is None:
        from dbmux.workers.worker import WorkerLink

        index, _, fd = args.worker.partition(":")
        link = WorkerLink(int(index))
        await link.connect(int(fd), stop.set)  # the supervisor is gone: drain and exit
        config = await link.config()  # the supervisor's, as the other workers run it
        server = link.process = Process(
            config, args.config, worker=link.index, peers=link, shares=link.share
        )
        await server.start()
        link.ready()
        return await _until_stopped(server, stop, hup=False)
    server = Process(config, args.config)
    await server.start()
    return await _ready(server, stop)


async def _ready(server: Servable, stop: asyncio.Event) -> int:
    log.info(
        "dbmux %s ready (%s); SIGHUP reloads, SIGTERM or Ctrl-C drains and stops",
        __version__,
        server.describe(),
    )
    return await _until_stopped(server, stop, hup=True)


async def _until_stopped(server: Servable, stop: asyncio.Event, *, hup: bool) -> int:
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[object]] = set()
    draining: list[asyncio.Task[object]] = []

    def on_stop() -> None:
        if stop.is_set():
            log.warning("stopping at once")
            for task in draining:
                task.cancel()
        stop.set()

    def on_hup() -> None:
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    if hup:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    else:  # a worker: its supervisor reloads it
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
    await stop.wait()
    log.info("draining for up to %g s", server.config.shutdown_timeout)
    draining.append(loop.create_task(server.drain()))
    try:
        await draining[0]
    except asyncio.CancelledError:
        await server.stop()
    log.info("stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format, worker=args.worker)
    config = load_config(args.config) if args.worker is None else None
    # A supervisor relays no client's bytes: the standard loop, without uvloop's memory.
    supervising = config is not None and config.worker_count > 1
    return (asyncio.run if supervising else run)(_serve(args, config))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    from dbmux.auth.secrets import read_secret

    for proxy in config.proxies:
        users = {
            read_secret(
                entry.secret,
                base_dir=config.base_dir,
                aws_endpoint_url=config.secrets.aws_endpoint_url,
            ).username
            for entry in proxy.auth
        }
        targets = ", ".join(f"{t.host}:{t.port}" for t in proxy.target_group.targets)
        print(
            f"proxy {proxy.name}: {proxy.engine_family} on {proxy.listen} -> {targets}; "
            f"users: {', '.join(sorted(users))}"
            + ("; transaction_replay" if proxy.transaction_replay else "")
        )
        verifier = TokenVerifier.for_proxy(proxy, config.base_dir)
        if verifier is not None:
            kinds = [f"Ed25519 keys {', '.join(sorted(verifier.keys))}"] if verifier.keys else []
            if verifier.oidc is not None:
                kinds.append(f"JWTs of {verifier.oidc.issuer} ({len(verifier.jwks)} keys)")
            print(f"  auth tokens: {'; '.join(kinds)}; hosts {', '.join(sorted(verifier.hosts))}")
        for endpoint in proxy.endpoints:
            extra = ""
            if endpoint.max_replica_lag is not None:
                extra += f", max_replica_lag {endpoint.max_replica_lag:g} s"
            if endpoint.fallback_to_writer:
                extra += ", falls back to the writer"
            print(
                f"  endpoint {endpoint.name}: {endpoint.target_role.value} on "
                f"{endpoint.listen}{extra}"
            )
    if config.worker_count > 1:
        from dbmux.workers.supervisor import refuse_port_zero

        refuse_port_zero(config)
    workers = config.worker_count
    print(f"{args.file}: OK ({workers} worker{'s' if workers > 1 else ''})")
    return 0


def cmd_rsa_public_key(args: argparse.Namespace) -> int:
    """What MySQL clients pin (--server-public-key-path, server_public_key): the public half
    of each MySQL proxy's RSA key, generated and kept now if `serve` has not yet."""
    config = load_config(args.file)
    from dbmux.auth.mysql import load_rsa_key, rsa_key_file

    proxies = [p for p in config.proxies if p.engine_family == "MYSQL"]
    if not proxies:
        print(f"dbmux: {args.file} has no MYSQL proxy", file=sys.stderr)
        return 1
    for proxy in proxies:
        key = load_rsa_key(proxy, config.base_dir, config.state_path)
        print(f"# proxy {proxy.name}: {rsa_key_file(proxy, config.base_dir, config.state_path)}")
        print(key.public_pem.decode(), end="")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    try:
        token = generate_auth_token(
            args.host, args.port, args.user, private_key=args.key, lifetime=args.lifetime
        )
    except ValueError as error:
        print(f"dbmux token: {error}", file=sys.stderr)
        return 1
    print(token)
    return 0


def cmd_token_key(args: argparse.Namespace) -> int:
    kid = write_key_pair(args.private, args.public)
    print(
        f"key id {kid}: private key in {args.private} (keep it secret), public key in "
        f"{args.public} (list it in auth_tokens.public_key_files)"
    )
    return 0


def admin_url(listen_host: str, port: int) -> str:
    """The URL to reach an admin listener at: a wildcard address is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def cmd_describe(args: argparse.Namespace) -> int:
    from dbmux.admin.describe import DEFAULT_URL, AdminError, describe
    from dbmux.admin.listener import read_token

    url, reference, base_dir = args.admin, args.token, Path.cwd()
    if args.config is not None:
        config = load_config(args.config)
        listen = config.admin.listen
        url = url or admin_url(listen.host, listen.port)
        if reference is None and config.admin.token is not None:
            reference, base_dir = config.admin.token, config.base_dir
    if reference is not None and not reference.startswith(("env:", "file:")):
        print("dbmux describe: --token takes env:VAR or file:PATH", file=sys.stderr)
        return 2
    token = read_token(reference, base_dir) if reference is not None else None
    try:
        print(describe(args.what, url or DEFAULT_URL, token))
    except AdminError as error:
        print(f"dbmux describe: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging("warning")
    from dbmux.demo.run import run_demo

    return run_demo(
        clients=args.clients,
        max_connections=args.max_connections,
        mysql=not args.skip_mysql,
        failover=not args.skip_failover,
        tls=not args.no_tls,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbmux",
        description="A database proxy for PostgreSQL and MySQL/MariaDB: a warm pool of server "
        "connections multiplexed per transaction among many clients.",
    )
    parser.add_argument("--version", action="version", version=f"dbmux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the proxies of a config file",
        description="Run every proxy in the config file, in `workers` processes (default: one "
        "per core) sharing the ports and the connection budgets: SIGHUP reloads the file, "
        "SIGTERM or SIGINT drains (up to shutdown_timeout) and exits 0.",
    )
    serve.add_argument(
        "--config",
        "-c",
        type=Path,
        required=True,
        metavar="FILE",
        help="YAML config file (see README: Configuration)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line (default: text)",
    )
    serve.add_argument("--worker", help=argparse.SUPPRESS)  # INDEX:FD, from the supervisor
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser(
        "check-config",
        help="validate a config file and its secrets",
        description="Validate a config file, read its secrets, and print a "
        "summary; exit 1 naming each bad field.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    describe_cmd = sub.add_parser(
        "describe",
        help="show a running dbmux's proxies, targets, clients or servers",
        description="Ask a running dbmux's admin API (admin.listen) and print its proxies, "
        "their targets (role, health), their live client connections or their server "
        "connections as tables.",
    )
    describe_cmd.add_argument(
        "what",
        nargs="?",
        default="proxies",
        choices=["proxies", "targets", "clients", "servers"],
        help="default: proxies",
    )
    describe_cmd.add_argument(
        "--admin",
        metavar="URL",
        help="the admin API's URL (default: from --config's admin.listen, else "
        "http://127.0.0.1:9187)",
    )
    describe_cmd.add_argument(
        "--config", "-c", type=Path, metavar="FILE", help="the config file dbmux runs with"
    )
    describe_cmd.add_argument(
        "--token",
        metavar="env:VAR|file:PATH",
        help="where the bearer token is (default: --config's admin.token); never the token "
        "itself, which others could read in the process list",
    )
    describe_cmd.set_defaults(func=cmd_describe)

    public_key = sub.add_parser(
        "rsa-public-key",
        help="print the RSA public key MySQL clients can pin",
        description="Print the public half of each MySQL proxy's RSA key (caching_sha2_password "
        "full authentication without TLS), for mysql --server-public-key-path or a driver's "
        "server_public_key.",
    )
    public_key.add_argument("file", type=Path, metavar="FILE")
    public_key.set_defaults(func=cmd_rsa_public_key)

    token = sub.add_parser(
        "token",
        help="print a signed auth token to log in with (iam_auth)",
        description="Print a token that logs USER in through the dbmux proxy at HOST:PORT, "
        "valid for --lifetime seconds; send it as the password, over TLS (as `aws rds "
        "generate-db-auth-token` prints one for RDS Proxy). The proxy checks it with the "
        "public key in its auth_tokens.public_key_files.",
    )
    token.add_argument(
        "--host", "--hostname", required=True, help="the proxy's host name clients connect to"
    )
    token.add_argument("--port", type=int, required=True, help="the proxy's port")
    token.add_argument("--user", "--username", required=True, help="the database user")
    token.add_argument(
        "--key",
        type=Path,
        required=True,
        metavar="PRIVATE_KEY_FILE",
        help="the Ed25519 private key (PEM) written by `dbmux token-key`",
    )
    token.add_argument(
        "--lifetime",
        type=int,
        default=DEFAULT_LIFETIME,
        metavar="SECONDS",
        help=f"how long the token is valid (default: {DEFAULT_LIFETIME}; a proxy refuses "
        "more than its auth_tokens.max_lifetime)",
    )
    token.set_defaults(func=cmd_token)

    token_key = sub.add_parser(
        "token-key",
        help="write a new key pair to sign auth tokens with",
        description="Write a new Ed25519 key pair: the private key (mode 0600) signs tokens "
        "(`dbmux token --key`, dbmux.auth.generate_auth_token), the public key goes into "
        "the proxy's auth_tokens.public_key_files. Existing files are never overwritten.",
    )
    token_key.add_argument(
        "--private", type=Path, required=True, metavar="FILE", help="private key file to create"
    )
    token_key.add_argument(
        "--public", type=Path, required=True, metavar="FILE", help="public key file to create"
    )
    token_key.set_defaults(func=cmd_token_key)

    demo = sub.add_parser(
        "demo",
        help="storm a throwaway database, directly and through dbmux",
        description="Start a throwaway PostgreSQL, run a serverless-style "
        "connection storm straight at it and then through dbmux, and report; then the same "
        "against a throwaway MariaDB; then a failover: writers through dbmux while a "
        "PostgreSQL primary is killed and its replica promoted.",
    )
    demo.add_argument(
        "--clients",
        type=int,
        default=400,
        help="concurrent short-lived clients in the storm (default: 400)",
    )
    demo.add_argument(
        "--max-connections",
        type=int,
        default=100,
        help="max_connections of the throwaway databases (default: 100)",
    )
    demo.add_argument(
        "--skip-mysql",
        action="store_true",
        help="storm only PostgreSQL, not MariaDB after it",
    )
    demo.add_argument(
        "--skip-failover",
        action="store_true",
        help="leave out the failover (a PostgreSQL primary killed, the replica promoted)",
    )
    demo.add_argument(
        "--no-tls",
        action="store_true",
        help="clients in plaintext (by default the databases and dbmux offer TLS with a "
        "throwaway CA's certificates and every client uses it, checking the certificate)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, SecretError, TlsError, TokenKeyError, RsaKeyError) as error:
        print(f"dbmux: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
