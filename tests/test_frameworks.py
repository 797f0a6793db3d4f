"""Web frameworks under real servers: every answered request's event arrives once.

- a raw ASGI app in ``SamsaraLifespan`` under gunicorn with 4 ``UvicornWorker``
  workers and samsara_mp's gunicorn hooks, with a SIGHUP mid-run;
- a Starlette app whose ``lifespan=`` is samsara_mp's under ``uvicorn --workers 3``
  (spawned workers, the first of which elects the publisher), stopped with SIGTERM;
- Django (``INSTALLED_APPS``) and Flask (``SamsaraMP.init_app``) under gunicorn
  ``-w 3 --preload`` with the hooks, stopped with SIGTERM; the preload master
  makes the client and stays single-threaded (and Django without ``--preload``);
- Django under ``runserver``, its autoreloader replacing its child mid-run;
- the three examples (``examples/django``, ``flask``, ``fastapi``) run as their READMEs say.

Each request records one ``test.request`` event with its id and the answering
worker's pid against a real IngestServer; the in-process tests below drive the
integrations' error paths and the async flush.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_until
from procs import alive, children, free_port, get_pid, kill_if

from samsara_mp import InvalidConfiguration, Publisher, get_client
from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer

APPS = Path(__file__).resolve().parent / "apps"
ROOT = APPS.parent.parent
CHANNEL = "fw"


def _env(server: IngestServer, runtime_dir: str, **extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(APPS), os.environ.get("PYTHONPATH", "")]),
        SAMSARA_MP_URL=server.url,
        SAMSARA_MP_CHANNEL=CHANNEL,
        SAMSARA_MP_RUNTIME_DIR=runtime_dir,
        SAMSARA_MP_PUBLISH_INTERVAL="100",
        SAMSARA_MP_MIN_BUFFER_SIZE="1",
        SAMSARA_MP_SEND_CLIENT_STATS="false",
        PYTHONWARNINGS="ignore::DeprecationWarning",  # uvicorn.workers says it moved to uvicorn-worker
        **extra,
    )


_get = get_pid


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Run:
    """One server process tree, driven with requests; every process stopped by pid."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path = APPS) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            # SIGINT as a terminal gives it, even when this run inherited it ignored
            # (a job started in the background): the tests stop servers as Ctrl-C does.
            self.master = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                           preexec_fn=_default_sigint)
        self.seen: set[int] = set()
        self.answered: dict[int, int] = {}  # request id -> pid of the worker that answered
        self.sent = 0
        self._rid_lock = threading.Lock()
        self.session = requests.Session()
        self.session.headers["Connection"] = "close"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, base: str) -> None:
        wait_until(lambda: self.master.poll() is not None or _get(self.session, base), 60, "the server")
        assert self.master.poll() is None, self.log()[-5000:]
        self.base = base
        self.note_children()

    def note_children(self) -> None:
        self.seen |= children(self.master.pid)

    def send(self) -> int | None:
        with self._rid_lock:
            rid, self.sent = self.sent, self.sent + 1
        pid = _get(self.session, f"{self.base}?rid={rid}")
        if pid is not None:
            self.answered[rid] = pid
        return pid

    def stop(self, timeout: float = 60) -> int:
        self.note_children()
        self.master.send_signal(signal.SIGTERM)
        return self.master.wait(timeout)

    def cleanup(self, marker: str) -> list[int]:
        """Stop whatever is left, by pid; the pids that were still alive."""
        self.note_children()
        if self.master.poll() is None:
            self.master.kill()
            self.master.wait(10)
        left = [pid for pid in self.seen if alive(pid)]
        for pid in self.seen:
            kill_if(pid, marker)
        return left


def _assert_each_answered_event_arrived_once(server: IngestServer, run: _Run, source_id: str) -> None:
    events = [e for e in server.events() if e["eventName"] == "test.request"]
    rids = Counter(e["rid"] for e in events)
    duplicated = {rid: n for rid, n in rids.items() if n > 1}
    assert not duplicated, f"events delivered more than once: {duplicated}"
    missing = sorted(set(run.answered) - set(rids))
    assert not missing, f"answered, never delivered: {missing[:20]} ({len(missing)}/{len(run.answered)})"
    assert set(rids) <= set(range(run.sent))
    assert all(e["pid"] == run.answered[e["rid"]] for e in events if e["rid"] in run.answered)
    assert {e["sourceId"] for e in events} == {source_id}, "the framework's settings reached every worker"


def _channel(server: IngestServer, runtime_dir: str) -> Channel:
    return Channel(Config.build(env={}, url=server.url, channel=CHANNEL, runtime_dir=runtime_dir))


def _gunicorn(app: str, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", "-c", str(APPS / "gunicorn_conf.py"),
        "--chdir", str(APPS), "--bind", f"127.0.0.1:{port}", *extra, app,
    ]


# ---- real servers ----
def test_uvicorn_workers_under_gunicorn_deliver_every_answered_request_through_a_hup(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    port = free_port()
    args = _gunicorn("asgi_app:application", port, "-w", "4", "-k", "uvicorn.workers.UvicornWorker")
    run = _Run(args, _env(server, runtime_dir), tmp_path / "gunicorn.log")
    publisher_pid: int | None = None
    try:
        run.wait_serving(f"http://127.0.0.1:{port}/")
        info = wait_until(_channel(server, runtime_dir).read_info, 10, "publisher.json")
        publisher_pid = int(info["pid"])
        assert info["owner_pid"] == run.master.pid, "the master owns the publisher"
        for _ in range(60):
            run.send()
        before_hup = set(run.answered.values())
        run.note_children()
        os.kill(run.master.pid, signal.SIGHUP)
        wait_until(lambda: (pid := run.send()) is not None and pid not in before_hup, 30,
                   "a worker forked after SIGHUP to answer")
        run.note_children()
        for _ in range(60):
            run.send()
        assert run.sent <= 1_000 and len(run.answered) >= 0.9 * run.sent, (run.sent, len(run.answered))
        assert run.stop() == 0, run.log()[-5000:]
        wait_until(lambda: not alive(publisher_pid), 15, "the publisher to stop with the master")
    finally:
        left = run.cleanup("gunicorn")
        if publisher_pid is not None:
            kill_if(publisher_pid, "samsara_mp")
    assert not left, f"workers left running: {left}"
    assert set(run.answered.values()) - before_hup, "SIGHUP replaced the workers"
    # SamsaraLifespan answered the lifespan protocol for the raw app, in every
    # worker that served, before and after the HUP (a worker still booting at
    # the HUP may be stopped before its startup: it is not counted).
    log = run.log()
    served = set(run.answered.values())
    started = {pid for pid in served if f"[{pid}] [INFO] Application startup complete" in log}
    assert started == served and len(served) >= 2, (served - started, log[-5000:])
    assert "lifespan' protocol appears unsupported" not in log, log[-5000:]
    _assert_each_answered_event_arrived_once(server, run, "asgi-raw")


def test_uvicorn_with_3_workers_stopped_by_sigterm_delivers_every_answered_request(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "--workers", "3", "--host", "127.0.0.1", "--port", str(port),
            "--timeout-graceful-shutdown", "20", "--no-access-log", "asgi_app:starlette_app"]
    run = _Run(args, _env(server, runtime_dir), tmp_path / "uvicorn.log")
    publisher_pid: int | None = None
    try:
        run.wait_serving(f"http://127.0.0.1:{port}/")
        info = wait_until(_channel(server, runtime_dir).read_info, 10, "publisher.json")
        publisher_pid = int(info["pid"])
        for _ in range(150):
            run.send()
        run.note_children()
        assert len(set(run.answered.values()) & run.seen) >= 2, "several workers answered"
        # On a loaded machine the third worker may still be booting: let it start first.
        wait_until(lambda: run.log().count("Application startup complete") >= 3, 30,
                   "the lifespan startup of all 3 workers")
        assert run.stop() == 0, run.log()[-5000:]
        # A worker elected the publisher, which outlives the workers and delivers what they shipped.
        wait_until(lambda: {e["rid"] for e in server.events()} >= set(run.answered), 20,
                   "every answered request's event")
        assert run.log().count("Application startup complete") == 3, run.log()[-5000:]
        assert alive(publisher_pid)
        os.kill(publisher_pid, signal.SIGTERM)
        wait_until(lambda: not alive(publisher_pid), 15, "the publisher to stop")
    finally:
        left = run.cleanup("spawn_main")  # uvicorn's workers are multiprocessing spawn children
        if publisher_pid is not None:
            kill_if(publisher_pid, "samsara_mp")
    assert not left, f"workers left running: {left}"
    assert len(run.answered) == run.sent == 150
    _assert_each_answered_event_arrived_once(server, run, "asgi-starlette")


@pytest.mark.parametrize(
    ("app", "source_id", "preload"),
    [("django_site.wsgi:application", "django-test", True), ("flask_app:app", "flask-test", True),
     ("django_site.wsgi:application", "django-test", False)],
    ids=["django-preload", "flask-preload", "django-fork-per-worker"],
)
def test_app_under_gunicorn_delivers_every_answered_request(
    app: str, source_id: str, preload: bool, server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    port = free_port()
    run = _Run(_gunicorn(app, port, "-w", "3", *(["--preload"] if preload else [])),
               _env(server, runtime_dir), tmp_path / "gunicorn.log")
    publisher_pid: int | None = None
    try:
        run.wait_serving(f"http://127.0.0.1:{port}/")
        # With --preload the app, and with it the process's client, was made in the master
        # before it forked; the client started no thread there, and left the publisher to on_starting.
        assert _threads(run.master.pid) == 1
        info = wait_until(_channel(server, runtime_dir).read_info, 10, "publisher.json")
        publisher_pid = int(info["pid"])
        assert info["owner_pid"] == run.master.pid, "the master owns the publisher"
        # From 3 threads at once, so that more than one worker is busy: one after another,
        # a loaded machine can hand every connection to the same worker.
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda _: run.send(), range(120)))
        assert len(run.answered) == run.sent
        assert _threads(run.master.pid) == 1
        assert run.stop() == 0, run.log()[-5000:]
        wait_until(lambda: not alive(publisher_pid), 15, "the publisher to stop with the master")
    finally:
        left = run.cleanup("gunicorn")
        if publisher_pid is not None:
            kill_if(publisher_pid, "samsara_mp")
    assert not left, f"workers left running: {left}"
    assert len(set(run.answered.values())) >= 2, "several workers answered"
    _assert_each_answered_event_arrived_once(server, run, source_id)


def test_django_runserver_autoreloader_children_deliver_every_answered_request(
    server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    import shutil

    site = tmp_path / "django_site"  # a copy, so that touching it reloads only this server
    shutil.copytree(APPS / "django_site", site, ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    env = _env(server, runtime_dir, DJANGO_SETTINGS_MODULE="django_site.settings")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])
    args = [sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}"]
    run = _Run(args, env, tmp_path / "runserver.log", cwd=tmp_path)
    info: dict[str, Any] | None = None
    try:
        run.wait_serving(f"http://127.0.0.1:{port}/")
        first = run.send()
        for _ in range(19):
            run.send()
        info = _channel(server, runtime_dir).read_info()

        def reloaded() -> bool:
            # Touched at every poll while the first child lives (the reloader's first look
            # at a file only notes its mtime), never after: a touch that the new child's
            # reloader sees would replace it again, under the test's feet.
            if alive(first):
                (site / "urls.py").touch()
            return (pid := run.send()) is not None and pid != first

        wait_until(reloaded, 30, "the autoreloader to replace its child")
        for _ in range(20):
            run.send()
        second = run.answered[run.sent - 1]
        # Stop it as Ctrl-C does: SIGINT to the child, then to the reloader (both by pid).
        run.note_children()
        assert children(run.master.pid) == {second}
        os.kill(second, signal.SIGINT)
        wait_until(lambda: not alive(second), 20, "the child to leave")
        os.kill(run.master.pid, signal.SIGINT)
        run.master.wait(20)
        # No third child: nothing touched a file after the second one started.
        assert run.log().count("Performing system checks") == 2, run.log()[-3000:]
        wait_until(lambda: {e["rid"] for e in server.events()} >= set(run.answered), 20,
                   "every answered request's event")
    finally:
        left = run.cleanup("runserver")
        if info is not None:
            kill_if(int(info["pid"]), "samsara_mp")
    assert not left, left
    assert info is not None and info["owner_pid"] is None  # elected by the reloader's own client
    assert first != second and run.master.pid not in run.answered.values()
    assert len(run.answered) >= 40  # requests sent while the child was being replaced got no answer
    _assert_each_answered_event_arrived_once(server, run, "django-test")


# ---- Django: configuration errors ----
@pytest.mark.parametrize(("bad", "where"), [
    ("publish_interval", "settings.SAMSARA_MP['publish_interval']: must be >= 1"),
    ("type", "settings.SAMSARA_MP: must be a dict"),
])
def test_django_refuses_a_bad_setting_with_improperly_configured_naming_the_key(
    bad: str, where: str, runtime_dir: str
) -> None:
    code = (
        "import django, os\n"
        "from django.core.exceptions import ImproperlyConfigured\n"
        "from samsara_mp import InvalidConfiguration\n"
        "try:\n"
        "    django.setup()\n"
        "except ImproperlyConfigured as exc:\n"
        "    assert isinstance(exc.__cause__, InvalidConfiguration), exc.__cause__\n"
        "    print(exc.__cause__.key, '|', exc)\n"
        "else:\n"
        "    raise SystemExit('django.setup() accepted a bad SAMSARA_MP')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(APPS)]),
               DJANGO_SETTINGS_MODULE="django_site.settings", SMP_TEST_DJANGO_BAD=bad,
               SAMSARA_MP_URL="http://127.0.0.1:9/", SAMSARA_MP_RUNTIME_DIR=runtime_dir)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    key, _, message = proc.stdout.strip().partition(" | ")
    assert key == ("SAMSARA_MP" if bad == "type" else bad)
    assert where in message
    assert os.listdir(runtime_dir) == [], "no client (no channel) was made from a bad setting"


# ---- Flask in-process ----
def test_flask_factory_configures_the_process_client_and_refuses_a_bad_key(
    publisher: Publisher, fast_config: dict[str, Any], server: IngestServer
) -> None:
    from flask import Flask

    from samsara_mp.integrations.flask import SamsaraMP

    samsara = SamsaraMP(sourceId="from-defaults")
    bad = Flask("bad")
    bad.config["SAMSARA_MP"] = {**fast_config, "no_such_key": 1}
    with pytest.raises(InvalidConfiguration) as excinfo:
        samsara.init_app(bad)
    assert excinfo.value.key == "no_such_key" and "samsara_mp" not in bad.extensions

    app = Flask("good")
    app.config["SAMSARA_MP"] = {**fast_config}

    @app.get("/")
    def view() -> str:
        samsara.client.record_event(eventName="flask.view")
        return "ok"

    client = samsara.init_app(app)
    try:
        assert app.extensions["samsara_mp"] is client is get_client()
        assert client.config.sourceId == "from-defaults"  # SamsaraMP's defaults under app.config's
        assert app.test_client().get("/").status_code == 200
        assert client.flush(timeout=10)
    finally:
        client.close()
    assert [e["sourceId"] for e in server.events()] == ["from-defaults"]


# ---- ASGI in-process: the lifespan protocol and the async flush ----
async def _drive_lifespan(app: Any) -> list[dict[str, Any]]:
    """Run one startup and shutdown against ``app`` as a server would; what it sent."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            get_client().record_event(eventName="asgi.between")
            await inbox.put({"type": "lifespan.shutdown"})

    await inbox.put({"type": "lifespan.startup"})
    await asyncio.wait_for(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send), 30)
    return sent


def test_samsara_lifespan_answers_startup_and_ships_at_shutdown_or_reports_a_bad_key(
    publisher: Publisher, fast_config: dict[str, Any], server: IngestServer
) -> None:
    from samsara_mp.integrations.asgi import SamsaraLifespan

    async def no_lifespan(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("this app serves http only")

    bad = asyncio.run(_drive_lifespan(SamsaraLifespan(no_lifespan, **{**fast_config, "publish_interval": 0})))
    assert [m["type"] for m in bad] == ["lifespan.startup.failed"]
    assert "publish_interval" in bad[0]["message"]

    sent = asyncio.run(_drive_lifespan(SamsaraLifespan(no_lifespan, **fast_config, sourceId="lifespan")))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert _closed_default_client(), "shutdown closed the process's client"
    wait_until(lambda: len(server.events()) == 1, 10, "the event recorded between startup and shutdown")
    assert server.events()[0]["sourceId"] == "lifespan"

    # An app that runs the protocol itself (Starlette): the client lives inside its lifespan.
    from starlette.applications import Starlette

    sent = asyncio.run(_drive_lifespan(SamsaraLifespan(Starlette(), **fast_config, sourceId="inner")))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert _closed_default_client()
    wait_until(lambda: len(server.events()) == 2, 10, "the event recorded inside Starlette's lifespan")
    assert server.events()[1]["sourceId"] == "inner"


def _closed_default_client() -> bool:
    from samsara_mp import client as client_module

    default = client_module._default_client
    return default is None or default.closed


def test_aflush_waits_off_the_event_loop(
    publisher: Publisher, fast_config: dict[str, Any], server: IngestServer
) -> None:
    from samsara_mp import SamsaraClient

    async def main() -> tuple[bool, int, float]:
        client = SamsaraClient(**fast_config, sourceId="async")
        client.record_event(eventName="async.flushed")
        server.inject(status=None, latency=0.5)  # the next POST answers after half a second
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        flushed = await client.aflush(timeout=10)
        took = time.monotonic() - started
        ticker.cancel()
        assert await client.aclose(timeout=5)
        return flushed, ticks, took

    flushed, ticks, took = asyncio.run(main())
    assert flushed and took >= 0.5
    assert ticks >= 0.5 * took / 0.01, f"the loop ran {ticks} ticks in {took:.2f}s of flush"
    assert len(server.events()) == 1


# ---- the examples, run as their READMEs say (on a free port, against the test's server) ----
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize(("name", "command", "source_id"), [
    ("django", ["-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", "127.0.0.1:{port}"], "django-example"),
    ("flask", ["-m", "gunicorn", "-w", "2", "--preload", "--bind", "127.0.0.1:{port}", "app:create_app()"],
     "flask-example"),
    ("fastapi", ["-m", "uvicorn", "--workers", "2", "--port", "{port}", "app:app"], "fastapi-example"),
])
def test_the_framework_examples_serve_and_deliver(
    name: str, command: list[str], source_id: str, server: IngestServer, runtime_dir: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMSARA_")}
    env.update(SAMSARA_MP_URL=server.url, SAMSARA_MP_RUNTIME_DIR=runtime_dir,
               PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore::DeprecationWarning")
    args = [sys.executable, *(part.format(port=port) for part in command)]
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        master = subprocess.Popen(args, env=env, cwd=EXAMPLES / name, stdout=log, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    channel = Channel(Config.build(env={}, url=server.url, runtime_dir=runtime_dir))
    info: dict[str, Any] | None = None
    try:
        session = requests.Session()
        session.headers["Connection"] = "close"
        url = f"http://127.0.0.1:{port}/hello"

        def ok() -> bool:
            try:
                return session.get(url, timeout=5).status_code == 200
            except requests.RequestException:
                return False

        wait_until(lambda: master.poll() is not None or ok(), 60, f"the {name} example")
        assert master.poll() is None, log_path.read_text()
        answered = 1 + sum(ok() for _ in range(4))
        seen |= children(master.pid)
        info = channel.read_info()
        master.send_signal(signal.SIGTERM)
        assert master.wait(60) == 0, log_path.read_text()[-5000:]
        views = wait_until(
            lambda: len(v := [e for e in server.events() if e["eventName"] == "page.view"]) >= answered and v,
            20, "the example's events")
    finally:
        seen |= children(master.pid)
        if master.poll() is None:
            master.kill()
            master.wait(10)
        for pid in seen:
            kill_if(pid, "spawn_main" if name == "fastapi" else "gunicorn")  # uvicorn spawns its workers
        if info is not None:
            kill_if(int(info["pid"]), "samsara_mp")  # an auto-started publisher (flask, fastapi)
    assert answered == len(views) == 5
    assert {(e["sourceId"], e["path"]) for e in views} == {(source_id, "/hello")}
    assert not [pid for pid in seen if alive(pid)]
