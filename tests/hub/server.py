"""A Hub-compatible server on 127.0.0.1 for the tests: olah for reads, a small front for writes.

Layout of one test session::

    huggingface_hub / transformers  --HF_ENDPOINT-->  FrontServer (in this process, thread)
                                                         |-- write endpoints -> git commits in mirror_dir
                                                         '-- everything else -> olah (subprocess) -> mirror_dir

``prepare_hub_environment()`` must run before ``huggingface_hub`` is imported (the client reads
``HF_ENDPOINT`` and ``HF_HOME`` at import), which is why ``tests/conftest.py`` calls it at import time.
``HubServer`` then starts olah lazily, the first time a test asks for the ``hub`` fixture.

Example (what ``tests/conftest.py`` does)::

    HUB_ENVIRONMENT = prepare_hub_environment()

    @pytest.fixture(scope="session")
    def hub():
        with HubServer(HUB_ENVIRONMENT) as server:
            yield server
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import git_mirror, write_api
from .front import FrontServer, RequestRecord

OLAH_PYTHON_ENV = "HUB_TESTS_OLAH_PYTHON"
OLAH_VENV = Path(__file__).resolve().parents[2] / ".venv-olah"
INSTALL_HINT = "python -m venv .venv-olah && .venv-olah/bin/pip install 'olah==0.5.4'"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
# A fake token: the client refuses to write without one, the front server accepts only this one.
TEST_TOKEN = "hf_test_token"

_ENV_SET = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# Variables that would send the client elsewhere than the fresh HF_HOME, use a real token, or stop it
# from talking to the loopback Hub at all.
_ENV_REMOVED = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_XET_CACHE",
    "HF_ASSETS_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


@dataclass(frozen=True)
class HubEnvironment:
    """The reserved endpoint (a bound, not yet listening socket) and the fresh ``HF_HOME``."""

    front: FrontServer
    hf_home: Path

    @property
    def endpoint(self) -> str:
        return self.front.url


def prepare_hub_environment() -> HubEnvironment:
    """Reserve a loopback port and point the Hub client at it; call before ``huggingface_hub`` is imported.

    Sets ``HF_ENDPOINT`` (the reserved port), ``HF_HOME`` (a new temporary folder, removed at exit),
    disables telemetry and progress bars, adds 127.0.0.1 to ``NO_PROXY``, and removes the
    variables that would redirect the cache, inject a real token or force offline mode. Until
    ``HubServer.start`` runs, connections to the endpoint are refused immediately, so tests that never ask
    for the ``hub`` fixture cannot reach any Hub.

    Example:
        >>> env = prepare_hub_environment()          # doctest: +SKIP
        >>> os.environ["HF_ENDPOINT"] == env.endpoint  # doctest: +SKIP
        True
    """
    front = FrontServer("127.0.0.1", 0)
    hf_home = Path(tempfile.mkdtemp(prefix="hub-tests-hf-home-"))
    atexit.register(shutil.rmtree, hf_home, ignore_errors=True)
    atexit.register(front.server_close)
    for name in _ENV_REMOVED:
        os.environ.pop(name, None)
    os.environ.update(_ENV_SET, HF_ENDPOINT=front.url, HF_HOME=str(hf_home))
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
    return HubEnvironment(front, hf_home)


def find_olah_python() -> str:
    """Return the interpreter that has olah: ``$HUB_TESTS_OLAH_PYTHON``, ``.venv-olah``, or this one.

    Raises:
        RuntimeError: if none of them has olah, with the command that installs it.
    """
    override = os.environ.get(OLAH_PYTHON_ENV)
    if override:
        if not Path(override).is_file():
            raise RuntimeError(f"{OLAH_PYTHON_ENV}={override!r} is not an interpreter path")
        return override
    venv_python = OLAH_VENV / "bin" / "python"
    if venv_python.is_file():
        return str(venv_python)
    if importlib.util.find_spec("olah") is not None:
        return sys.executable
    raise RuntimeError(
        f"olah is not installed; the Hub tests need it. From the repository root: {INSTALL_HINT}"
    )


# Runs `python -m olah.server ARGS` so that, on Linux, olah also ends when the test process dies without
# running its teardown (SIGKILL, or a SIGTERM from a CI timeout): PR_SET_PDEATHSIG (prctl option 1) sends
# SIGTERM when the thread that started it exits (pytest starts session fixtures on its main thread).
_LINUX_LAUNCHER = """
import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != parent:
    sys.exit("hub tests: the test process ended before olah started")
runpy.run_module("olah.server", run_name="__main__", alter_sys=True)
"""


def _olah_command(python: str, args: list[str]) -> list[str]:
    if sys.platform == "linux":
        return [python, "-c", _LINUX_LAUNCHER, str(os.getpid()), *args]
    return [python, "-m", "olah.server", *args]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OlahProcess:
    """One ``olah.server`` subprocess serving ``mirror_dir`` offline on a free loopback port.

    Example:
        >>> olah = OlahProcess(find_olah_python(), mirror_dir, work_dir, public_netloc="127.0.0.1:8000")  # doctest: +SKIP
        >>> olah.start(); olah.port                                                                     # doctest: +SKIP
    """

    def __init__(self, python: str, mirror_dir: Path, work_dir: Path, public_netloc: str) -> None:
        self.python = python
        self.mirror_dir = mirror_dir
        self.work_dir = work_dir
        self.public_netloc = public_netloc
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_dir = work_dir / "olah-logs"
        self.stdout_path = work_dir / "olah-stdout.log"

    def _write_config(self, port: int) -> Path:
        # olah takes these settings only from a config file. `offline` keeps it from asking huggingface.co
        # (every request would wait for a network timeout); mirror-netloc is where the client sees it.
        config = self.work_dir / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f'repos-path = "{(self.work_dir / "olah-cache").as_posix()}"\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "{self.public_netloc}"\n'
            f'mirror-lfs-netloc = "{self.public_netloc}"\n'
            f'mirrors-path = ["{self.mirror_dir.as_posix()}"]\n'
            "metadata-cache-ttl = 0\n"
            "\n[accessibility]\n"
            "offline = true\n"
        )
        return config

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start olah and wait until it answers HTTP.

        Raises:
            RuntimeError: if it exits or does not answer within ``timeout_s``; the message ends with the
                tail of olah's output.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._start_once(timeout_s):
                return
            # Another process took the free port between our probe and olah's bind: try a new one.
        raise RuntimeError(f"olah could not bind a free port three times:\n{self.log_tail()}")

    def _start_once(self, timeout_s: float) -> bool:
        self.port = _free_port()
        config = self._write_config(self.port)
        command = _olah_command(self.python, ["-c", str(config), "--log-path", str(self.log_dir)])
        with open(self.stdout_path, "wb") as out:
            # Own process group, so stop() ends olah and anything it spawned, and nothing else.
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "address already in use" in self.log_tail().lower():
                    return False
                raise RuntimeError(f"olah exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self._answers():
                return True
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"olah did not answer on port {self.port} within {timeout_s:.0f} s:\n{tail}")

    def _answers(self) -> bool:
        # Any HTTP status means the server is up; olah's "/" renders a template and is slower.
        url = f"http://127.0.0.1:{self.port}/api/models/x/y/revision/main"
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate olah's process group (SIGTERM, then SIGKILL after a timeout) and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of olah's stdout/stderr and of its own log file."""
        texts = []
        for path in [self.stdout_path, *sorted(self.log_dir.glob("*.log"))]:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                texts.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(texts) or "(olah wrote no output)"


class HubServer:
    """The loopback Hub of a test session: endpoint, mirror folder, token, and request log.

    Example:
        >>> def test_load(hub, tmp_path):                                              # doctest: +SKIP
        ...     model.save_pretrained(tmp_path)
        ...     sha = hub.create_repo_from_folder("org/classifier", tmp_path)
        ...     before = hub.download_count("org/classifier", "model.safetensors")
        ...     ViTForImageClassification.from_pretrained("org/classifier", revision=sha)
        ...     assert hub.download_count("org/classifier", "model.safetensors") == before + 1
    """

    token = TEST_TOKEN

    def __init__(self, environment: HubEnvironment, olah_python: str | None = None) -> None:
        self.environment = environment
        self.olah_python = olah_python
        self.work_dir: Path | None = None
        self.olah: OlahProcess | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"HubServer(endpoint={self.endpoint!r}, mirror_dir={str(self.mirror_dir)!r})"

    @property
    def endpoint(self) -> str:
        """The URL the Hub client uses (``HF_ENDPOINT``)."""
        return self.environment.endpoint

    @property
    def mirror_dir(self) -> Path:
        """The folder olah serves: ``<mirror_dir>/models/<org>/<name>`` are bare git repositories."""
        if self.work_dir is None:
            raise RuntimeError("the Hub server is not started; call start() first")
        return self.work_dir / "mirror"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> HubServer:
        """Start olah and the front server; return self.

        Raises:
            RuntimeError: if ``huggingface_hub`` was imported with another endpoint, olah is missing, or
                olah does not come up within ``timeout_s`` (with the tail of its log).
        """
        if self.olah is not None:
            raise RuntimeError("the Hub server is already running")
        _check_client_configuration(self.environment)
        python = self.olah_python or find_olah_python()
        self.work_dir = Path(tempfile.mkdtemp(prefix="hub-tests-server-"))
        self.mirror_dir.mkdir()
        netloc = urlsplit(self.endpoint).netloc
        self.olah = OlahProcess(python, self.mirror_dir, self.work_dir, public_netloc=netloc)
        try:
            self.olah.start(timeout_s)
            context = write_api.WriteContext(self.mirror_dir, self.endpoint, self.token)
            self.environment.front.start(("127.0.0.1", self.olah.port), context)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both servers and delete the mirror (safe to call twice)."""
        self.environment.front.stop()
        if self.olah is not None:
            self.olah.stop()
            self.olah = None
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def create_repo_from_folder(
        self,
        repo_id: str,
        folder: str | os.PathLike,
        branch: str = git_mirror.DEFAULT_BRANCH,
        message: str = "Add files",
        repo_type: str = "model",
    ) -> str:
        """Publish ``folder`` as the new repository ``repo_id`` and return its commit sha."""
        return git_mirror.create_repo_from_folder(
            self.mirror_dir, repo_id, folder, branch, message, repo_type
        )

    def commit_folder(
        self,
        repo_id: str,
        folder: str | os.PathLike,
        branch: str = git_mirror.DEFAULT_BRANCH,
        message: str = "Update files",
        start_point: str | None = None,
        repo_type: str = "model",
    ) -> str:
        """Replace the files of ``branch`` (created at ``start_point`` if new) with ``folder``; return the sha."""
        return git_mirror.commit_folder(
            self.mirror_dir, repo_id, folder, branch, message, start_point, repo_type
        )

    def create_branch(
        self, repo_id: str, branch: str, revision: str = git_mirror.DEFAULT_BRANCH, repo_type: str = "model"
    ) -> str:
        """Create ``branch`` at ``revision`` in an existing repository and return the commit sha."""
        return git_mirror.create_branch(
            git_mirror.repo_dir(self.mirror_dir, repo_id, repo_type), branch, revision
        )

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of every request the endpoint answered so far, in order."""
        front = self.environment.front
        with front.records_lock:
            return list(front.records)

    def download_count(self, repo_id: str | None = None, filename: str | None = None) -> int:
        """Count successful file downloads (``GET .../resolve/...``), optionally of one repo and file.

        A load served from the local cache makes no such request (at most a ``HEAD``), so comparing
        counts before and after a call tells whether it downloaded anything.
        """
        count = 0
        for record in self.requests:
            if record.method != "GET" or record.status >= 400:
                continue
            parsed = _parse_resolve_path(record.path)
            if parsed is None:
                continue
            if (repo_id is None or parsed[0] == repo_id) and (filename is None or parsed[1] == filename):
                count += 1
        return count


def _parse_resolve_path(path: str) -> tuple[str, str] | None:
    """``/[type/]org/name/resolve/rev/file`` -> (``org/name``, ``file``), else None."""
    parts = unquote(urlsplit(path).path).strip("/").split("/")
    if parts and parts[0] in write_api.URL_REPO_TYPES and "resolve" in parts[3:4]:
        parts = parts[1:]
    if len(parts) < 5 or parts[2] != "resolve":
        return None
    return f"{parts[0]}/{parts[1]}", "/".join(parts[4:])


def _check_client_configuration(environment: HubEnvironment) -> None:
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and constants.ENDPOINT != environment.endpoint:
        raise RuntimeError(
            f"huggingface_hub was imported with HF_ENDPOINT={constants.ENDPOINT!r} before the test Hub "
            f"environment was prepared; prepare_hub_environment() must run before anything imports it "
            "(tests/conftest.py calls it at import time)."
        )
