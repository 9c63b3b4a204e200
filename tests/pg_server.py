"""A throwaway PostgreSQL server for tests: its own data directory, a loopback port, a database and a user.

Uses the server binaries of Debian's ``postgresql`` package (``.ci/run`` installs it) or any ``initdb`` on
PATH; run as the ``postgres`` user when the tests run as root (the server refuses root). Skips the test,
saying why, only when there is no server binary to run.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class PgServer:
    host: str
    port: int
    user: str
    password: str
    database: str


def _bin_dir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server():
    bindir = _bin_dir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("no PostgreSQL server binary (initdb, pg_ctl): install Debian's postgresql package "
                    "(.ci/run does, as root)")
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
    root = Path(tempfile.mkdtemp(prefix="servetune-pg-"))
    data = root / "data"
    superpw, pw = secrets.token_hex(12), secrets.token_hex(12)
    (root / "pw").write_text(superpw + "\n")
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
        os.chown(root / "pw", user.pw_uid, user.pw_gid)
    run_as = {"user": user.pw_uid, "group": user.pw_gid} if user is not None else {}
    port = _free_port()

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, text=True, cwd=root, timeout=120, **run_as)

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", f"--pwfile={root / 'pw'}", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off", "start")
        started = True
        import psycopg  # noqa: PLC0415 — optional (the postgres extra); callers skip without it

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=superpw, dbname="postgres",
                             autocommit=True) as con:
            con.execute(f"CREATE ROLE servetune LOGIN PASSWORD '{pw}'")
            con.execute("CREATE DATABASE servetune OWNER servetune")
        yield PgServer("127.0.0.1", port, "servetune", pw, "servetune")
    finally:
        if started:
            with contextlib.suppress(Exception):
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
