"""The authenticated MLflow server of the SLURM test (docs/slurm.md, section 3), as fixtures:
`mlflow server --app-name basic-auth` on 127.0.0.1, its admin password only in an auth config
file of mode 600 outside the repository, a pipeline user without admin rights and a second,
unrelated user; plus the `slurm` extra installed beside the venv when the venv lacks it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def slurm_extra_env(tmp_path_factory) -> dict:
    """Environment in which the `slurm` extra (executor plugin, MLflow's basic-auth app) is
    importable: what the venv lacks of it goes into a session folder on PYTHONPATH."""
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    # what `pip install -e '.[slurm]'` would add to this venv (already installed: kept)
    report = subprocess.run([*pip, "--dry-run", "--report", "-", *_slurm_extra()], check=True,
                            text=True, capture_output=True, timeout=600).stdout
    missing = [f"{p['metadata']['name']}=={p['metadata']['version']}"
               for p in json.loads(report)["install"]]
    if not missing:
        return {}
    target = tmp_path_factory.mktemp("slurm-extra")
    subprocess.run([*pip, "--no-deps", "--target", str(target), *missing], check=True,
                   timeout=600)
    pythonpath = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": pythonpath}
    probe = "import snakemake_executor_plugin_slurm, flask_wtf"
    subprocess.run([sys.executable, "-c", probe], check=True, env={**os.environ, **env})
    return env


def _slurm_extra() -> list[str]:
    """The requirements of pyproject's `slurm` extra."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return ["snakemake-executor-plugin-slurm>=2.0,<3", "mlflow[auth]>=3.0,<4"]
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["slurm"]


# The auth config of docs/slurm.md, section 3: users see only what they created or were granted.
AUTH_INI = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///{db}
admin_username = admin
admin_password = {password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


class MlflowServer(NamedTuple):
    uri: str
    user: str  # the pipeline's user (no admin rights), as docs/slurm.md creates it
    password: str
    stranger: tuple[str, str]  # another user of the server: must not see the pipeline's runs
    dir: Path  # the server's databases, artifacts and log


@pytest.fixture(scope="session")
def _mlflow_process(tmp_path_factory, slurm_extra_env):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 with SQLite backends only it writes,
    as on a login node. Started before the cluster: it takes 5-25 s to answer."""
    d = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    admin_password = secrets.token_urlsafe(24)
    ini = d / "auth.ini"
    ini.touch(mode=0o600)
    ini.write_text(AUTH_INI.format(db=d / "auth.db", password=admin_password))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_AUTH_ADMIN_")}
    env.update(slurm_extra_env, MLFLOW_AUTH_CONFIG_PATH=str(ini),
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32))
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", d, ("admin", admin_password)
    finally:
        # its own process group: the server and its workers, nothing else
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(_mlflow_process) -> MlflowServer:
    """The session's `mlflow server` once it answers, with the pipeline's user created by the
    admin (docs/slurm.md) and a second, unrelated user."""
    proc, uri, d, admin = _mlflow_process
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)  # /health needs no login
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(d / 'server.log').read_text()}")
            time.sleep(0.5)
    users = {}
    for name in ("ript", "stranger"):
        users[name] = secrets.token_urlsafe(24)
        status = http_status(f"{uri}/api/2.0/mlflow/users/create", admin,
                             {"username": name, "password": users[name]})
        assert status == 200, f"creating user {name}: HTTP {status}"
    return MlflowServer(uri, "ript", users["ript"], ("stranger", users["stranger"]), d)


def mlflow_runs(server: MlflowServer, experiment: str) -> list:
    """The experiment's runs, read as the pipeline's user (the client reads its credentials
    from the environment at each request)."""
    import mlflow

    creds = {"MLFLOW_TRACKING_USERNAME": server.user, "MLFLOW_TRACKING_PASSWORD": server.password}
    with mock.patch.dict(os.environ, creds):
        client = mlflow.MlflowClient(tracking_uri=server.uri)
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None, f"no MLflow experiment {experiment} on {server.uri}"
        return client.search_runs([exp.experiment_id], max_results=1000)


def http_status(url: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> int:
    """HTTP status of a GET (or a POST of `body` as JSON), with basic auth if given."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth:
        token = base64.b64encode(":".join(auth).encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def files_containing(root: Path, secret: str) -> list[Path]:
    """Files under `root` whose bytes contain `secret`."""
    needle = secret.encode()
    return [f for f in root.rglob("*") if f.is_file() and not f.is_symlink()
            and needle in f.read_bytes()]
