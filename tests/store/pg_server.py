"""A throwaway PostgreSQL cluster for the store tests: initdb in a temporary directory, the server on a
free 127.0.0.1 port with password authentication, one fresh database per test.

PostgreSQL refuses to run as root: as root the cluster belongs to the ``postgres`` user that Debian's
package creates (``nobody`` otherwise), and every server binary runs as that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT_S = 60


def find_postgres_bin() -> Path | None:
    """The newest directory holding initdb and pg_ctl: $COSYSERVE_TEST_PG_BIN, Debian's
    /usr/lib/postgresql/<version>/bin, or the PATH."""
    candidates = [os.environ.get("COSYSERVE_TEST_PG_BIN", "")]
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(n) for n in re.findall(r"\d+", p)], reverse=True
    )
    on_path = shutil.which("pg_ctl")
    candidates.append(str(Path(on_path).resolve().parent) if on_path else "")
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    user_name = "cosyserve"

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = _free_port()
        self.password = secrets.token_hex(8)
        self.root = Path(tempfile.mkdtemp(prefix="cosyserve-pg-"))  # not under pytest's 0700 basetemp
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.os_user = None
        if os.geteuid() == 0:
            names = {p.pw_name for p in pwd.getpwall()}
            self.os_user = "postgres" if "postgres" in names else "nobody"
            os.chown(self.root, pwd.getpwnam(self.os_user).pw_uid, -1)
        self.started = False

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        done = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]], user=self.os_user, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.is_file() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}{log}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user_name}:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.os_user:
            os.chown(pwfile, pwd.getpwnam(self.os_user).pw_uid, -1)
        self._run(
            "initdb",
            "-D", str(self.data),
            "-U", self.user_name,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",  # the test cluster's files; the server itself keeps fsync on
        )  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections=50"
        self._run("pg_ctl", "start", "-w", "-t", str(START_TIMEOUT_S), "-D", str(self.data), "-l", str(self.log),
                  "-o", options)  # fmt: skip
        self.started = True

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @contextmanager
    def fresh_database(self, hint: str) -> Iterator[str]:
        import psycopg

        name = "t_" + re.sub(r"\W", "_", hint.lower())[:40] + "_" + secrets.token_hex(3)
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            with psycopg.connect(self.url(), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
