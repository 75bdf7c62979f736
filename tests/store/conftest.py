import sys
from pathlib import Path

import pytest
from resources import missing

# The store tests share pg_server.py (pytest runs with --import-mode=importlib: no implicit sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_server import PostgresServer, find_postgres_bin


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session: a throwaway cluster on 127.0.0.1, stopped at the end."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        missing("no PostgreSQL server binaries (initdb, pg_ctl) found: apt-get install postgresql")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server, request):
    """The URL of a fresh, empty database on the session's server, dropped after the test."""
    with postgres_server.fresh_database(request.node.name) as url:
        yield url
