"""A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries, a data folder in a
temporary directory, listening on 127.0.0.1 at a free port, trust authentication, stopped and
removed afterwards. Postgres refuses to run as root; as root the server runs as the `postgres`
user the Debian package creates."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REQUIRE_ENV = "HCC_ASSETS_REQUIRE_POSTGRES"  # set by .ci/run: a missing server fails instead of skipping


def postgres_bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    bindir: Path
    folder: Path
    port: int
    user: str = "postgres"

    def libpq(self, database: str) -> str:
        """libpq settings of `database` on this server (DuckLake's `postgres:` catalog form)."""
        return f"dbname={database} host=127.0.0.1 port={self.port} user={self.user}"

    def create_database(self, name: str) -> None:
        subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                f"CREATE DATABASE {name}",
            ],
            check=True,
            capture_output=True,
        )

    def sql(self, database: str, query: str) -> str:
        return subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                query,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def stop(self) -> None:
        self._as_owner(
            [str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop"], check=False
        )

    def _as_owner(self, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True)


def start_postgres() -> PostgresServer:
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries not found (Debian package `postgresql`)")
    folder = Path(tempfile.mkdtemp(prefix="hcc-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    server = PostgresServer(bindir, folder, _free_port())
    try:
        server._as_owner(
            [
                str(bindir / "initdb"),
                "-D",
                str(folder / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        server._as_owner(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(folder / "data"),
                "-l",
                str(folder / "server.log"),
                "-o",
                f"-h 127.0.0.1 -p {server.port} -k {folder} -c fsync=off",
                "-w",
                "start",
            ]
        )
    except subprocess.CalledProcessError as error:
        log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"postgres did not start: {error.stderr}{log}") from None
    return server


def remove(server: PostgresServer) -> None:
    server.stop()
    shutil.rmtree(server.folder, ignore_errors=True)
