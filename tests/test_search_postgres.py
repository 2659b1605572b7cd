"""Search workers on PostgreSQL storage: two workers share one study on a throwaway server, a
rerun resumes it; a server that is down, or a database without its driver, is a clear error.
The server test skips where the PostgreSQL binaries or the psycopg driver are missing."""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hm3.cli import main

from conftest import free_port
from test_search import case, finished_trials, search_command, two_workers_share  # noqa: F401

pytestmark = pytest.mark.postgres



def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's newest."""
    on_path = shutil.which("pg_ctl")
    folders = ([os.path.dirname(on_path)] if on_path else []) + sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in map(Path, folders):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


@pytest.fixture
def postgres_url():
    """A PostgreSQL cluster in a temp folder on a free loopback port, trusting local logins;
    stopped and removed afterwards. initdb refuses root, so root runs it as `postgres` (or
    `nobody`) in a folder that user owns (pytest's tmp_path is root's alone)."""
    pytest.importorskip("psycopg", reason="psycopg (the test extra) is not installed")
    folder = postgres_bin()
    if folder is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    as_user = {}
    if os.geteuid() == 0:
        users = {user.pw_name: user for user in pwd.getpwall()}
        user = users.get("postgres") or users.get("nobody")
        if user is None:
            pytest.skip("running as root and no `postgres` or `nobody` user to run the server")
        as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    root = Path(tempfile.mkdtemp(prefix="hm3-pg-"))
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
    data, port = root / "data", free_port()

    def pg(*args):
        subprocess.run([str(arg) for arg in args], cwd=root, check=True, capture_output=True,
                       **as_user)

    try:
        try:
            pg(folder / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync",
               "--no-locale", "-E", "UTF8")
            pg(folder / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-t", "30", "-o",
               f"-h 127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off", "start")
        except subprocess.CalledProcessError as exc:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            # A machine that cannot host the server is not a failure of hm3 (the SQLite
            # two-worker test covers the same code); say why and skip.
            pytest.skip(f"could not start a throwaway PostgreSQL server: {exc}\n"
                        f"{exc.stderr.decode()}{log}")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([str(folder / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       cwd=root, capture_output=True, **as_user)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgres_study_and_a_rerun_resumes(case, postgres_url):  # noqa: F811
    trials = two_workers_share(case, postgres_url)
    assert main([*search_command(case, 10)[3:], "--storage", postgres_url]) == 0
    assert {t.number for t in finished_trials(postgres_url)} == {t.number for t in trials}


@pytest.mark.parametrize("url, says", [
    ("postgresql://postgres@127.0.0.1:{port}/postgres", "connection"),  # nothing listens there
    ("mysql://root@127.0.0.1:{port}/hm3", "pip install"),  # no MySQL driver installed
])
def test_storage_that_cannot_open_is_a_clear_error(case, capsys, url, says):  # noqa: F811
    url = url.format(port=free_port())
    assert main([*search_command(case, 2)[3:], "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hm3: error: cannot open the study storage {url}")
    assert says in err.lower()
    assert "Traceback" not in err and len(err.splitlines()) == 1
