"""Faults: kills of every entry point leave no process or shared memory; the launcher refuses ports in use and
foreign services; the servers need the run's key; the weight-sync directory is private."""
import asyncio
import contextlib
import hashlib
import http.server
import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_cmd
from rlt import procs
from rlt.errors import ConfigError
from rlt.generation.config import RolloutConfig

LAUNCH = ["./launch_with_server.sh", "1", "2", "cfgs/run_cfg/tiny_teacher_rlt.yaml"]
PY = sys.executable
SHM_CHILD = """
import multiprocessing, subprocess, sys, time
from multiprocessing import resource_tracker, shared_memory
seg = shared_memory.SharedMemory(create=True, size=1 << 16)
lock = multiprocessing.get_context("spawn").Lock()  # a named semaphore, mapped by its creator under a temporary name
# Python's resource tracker (which ignores SIGTERM and outlives this process) would unlink both once this process
# is gone; taken off its list, they are left for rlt's guard and owner to remove, which is what the tests check
resource_tracker.unregister(seg._name, "shared_memory")
resource_tracker.unregister(lock._semlock.name, "semaphore")
sub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)  # as torchrun
print("/dev/shm/" + seg.name, "/dev/shm/sem." + lock._semlock.name[1:], flush=True)
time.sleep(600)
"""


def env_with_venv(**extra) -> dict:
    return {**os.environ, "PATH": str(Path(PY).parent) + os.pathsep + os.environ["PATH"], **extra}


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.5)
    return result


def all_gone(*trees: procs.Tree) -> bool:
    """No process ever seen under these trees is alive."""
    return not any(tree.scan() for tree in trees)


def processes_mentioning(text: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def shm_names(segments) -> list[str]:
    return sorted(Path(s).name for s in segments)


# ----------------------------------------------------------------------------------------- rlt.procs
def test_guard_dies_with_its_owner_and_removes_the_groups_shared_memory(tmp_path):
    """SIGKILL of the owner: the guard's parent-death signal stops its group and unlinks the segment."""
    owner_src = ("import sys, time\nfrom rlt.procs import Guarded, TreeRecorder\n"
                 f"g = Guarded([sys.executable, '-c', {SHM_CHILD!r}], TreeRecorder())\n"
                 "print(g.pgid, flush=True)\ntime.sleep(600)\n")
    owner = subprocess.Popen([PY, "-c", owner_src], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        pgid = int(owner.stdout.readline())
        segments = owner.stdout.readline().split()
        tree = procs.Tree(pgid)
        assert all(map(os.path.exists, segments)) and len(tree.scan()) == 4  # guard, child, tracker, sleeper
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        wait_until(lambda: all_gone(tree), 30, "the guarded processes stop")
        assert not any(map(os.path.exists, segments))
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)


def test_group_killed_outright_is_cleaned_up_by_its_owner():
    """SIGKILL of the whole group (guard and resource tracker included): the owner's records unlink the shared
    memory segment and the named semaphore (which /proc/PID/maps shows only under its deleted temporary name)."""
    recorder = procs.TreeRecorder(interval=0.2)
    g = procs.Guarded([PY, "-c", SHM_CHILD], recorder, stdout=subprocess.PIPE, text=True)
    try:
        segments = g.proc.stdout.readline().split()
        wait_until(lambda: set(segments) <= g.tree.segments, 10, f"{segments} are recorded")
        assert len(g.tree.scan()) == 4  # guard, child, resource tracker, sleeper in a session of its own
        os.killpg(g.pgid, signal.SIGKILL)
        g.proc.wait()
        wait_until(lambda: len(g.tree.scan()) == 1, 10, "only the sleeper in its own session is left")
        assert all(map(os.path.exists, segments))  # nobody could clean up
        assert g.stop() == -signal.SIGKILL
        assert not any(map(os.path.exists, segments)) and all_gone(g.tree)
    finally:
        g.stop()
        recorder.close()


def test_guard_stops_its_group_on_sigterm_with_the_exit_code_of_the_signal():
    recorder = procs.TreeRecorder()
    g = procs.Guarded([PY, "-c", SHM_CHILD], recorder, grace=2, stdout=subprocess.PIPE, text=True)
    segments = g.proc.stdout.readline().split()
    g.tree.scan()
    assert g.stop() == 128 + signal.SIGTERM
    recorder.close()
    assert all_gone(g.tree) and not any(map(os.path.exists, segments))


def test_guard_reaps_the_orphans_it_adopted_so_its_group_is_gone_when_it_is():
    """The command exits leaving a child in the group (as vLLM's API server leaves its EngineCore): the guard
    adopts it, stops it and reaps it, so no zombie keeps the group alive after the guard was waited for."""
    orphaning = f"import subprocess; subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(600)'])"
    recorder = procs.TreeRecorder()
    for _ in range(3):  # init reaps orphans only after a while: each round would fail without the guard reaping
        g = procs.Guarded([PY, "-c", orphaning], recorder)
        assert g.proc.wait(timeout=60) == 0
        with pytest.raises(ProcessLookupError):
            os.killpg(g.pgid, 0)
        g.stop()
    recorder.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_supervised_command_is_stopped_with_its_supervisor(sig):
    """``python -m rlt.procs run -- CMD`` (what rlt.distill and rlt.eval do to themselves): Ctrl-C, kill or
    kill -9 of the supervisor stops everything CMD started and removes its shared memory."""
    sup = subprocess.Popen([PY, "-m", "rlt.procs", "run", "--", PY, "-c", SHM_CHILD], cwd=ROOT, stdout=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        segments = sup.stdout.readline().split()
        tree = procs.Tree(_children(sup.pid)[0])  # the guard
        assert len(tree.scan()) == 4
        os.kill(sup.pid, sig)
        assert sup.wait(timeout=30) == (-sig if sig == signal.SIGKILL else 128 + sig)
        wait_until(lambda: all_gone(tree), 30, "the supervised processes stop")
        assert not any(map(os.path.exists, segments))
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------- weight-sync directory
def test_sync_dir_is_private_unpredictable_and_never_a_symlink(tmp_path, monkeypatch):
    from rlt.generation import weight_sync as ws

    monkeypatch.delenv(ws.SYNC_DIR_ENV, raising=False)
    target = tmp_path / "attacker"
    target.mkdir()
    target.chmod(0o755)   # whatever the umask: another user's directory is readable, so not private
    a, b = ws.private_sync_dir(tmp_path), ws.private_sync_dir(tmp_path)
    assert a != b and a.name.startswith("rlt-sync-")
    assert stat.S_IMODE(a.stat().st_mode) == 0o700
    # the trainer's own directory (no launcher) is a new one: a symlink another user put at the name the
    # directory used to have (a hash of output_dir) is not followed
    out = tmp_path / "out"
    old_name = Path("/dev/shm") / f"rlt-sync-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]}"
    old_name.symlink_to(target)
    try:
        root, created = ws.sync_root(str(out), model_bytes=1)
    finally:
        old_name.unlink()
    assert created and root.parent == Path("/dev/shm") and not root.is_symlink() and root != old_name
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    root.rmdir()
    # a directory handed over in $RLT_SYNC_DIR is used only if it is a private directory of this user
    link = tmp_path / "link"
    link.symlink_to(target)
    for bad in (link, target, tmp_path / "missing"):  # a symlink, a 0755 directory, nothing
        monkeypatch.setenv(ws.SYNC_DIR_ENV, str(bad))
        with pytest.raises(RuntimeError, match="RLT_SYNC_DIR"):
            ws.sync_root(str(tmp_path / "out"), model_bytes=1)
    monkeypatch.setenv(ws.SYNC_DIR_ENV, str(a))
    assert ws.sync_root(str(tmp_path / "out"), model_bytes=1) == (a, False)


def test_trainer_without_launcher_removes_its_sync_dir_on_close(monkeypatch):
    from rlt.generation import weight_sync as ws

    monkeypatch.delenv(ws.SYNC_DIR_ENV, raising=False)
    sync = ws.FilesystemWeightSync(pool=None, output_dir="unused")
    sync.root, sync.created = ws.sync_root("unused", model_bytes=1)
    (sync.root / "step-1").mkdir()
    sync.close()
    assert not sync.root.exists()


def test_weight_copies_in_the_output_dir_are_removed_on_close(tmp_path, monkeypatch):
    """No room in /dev/shm: the copies go to <output_dir>/weight_sync, and the last one goes at the end."""
    from rlt.generation import weight_sync as ws

    monkeypatch.delenv(ws.SYNC_DIR_ENV, raising=False)
    out = tmp_path / "out"
    sync = ws.FilesystemWeightSync(pool=None, output_dir=str(out))
    sync.root, sync.created = ws.sync_root(str(out), model_bytes=10 ** 15)  # more than any /dev/shm holds
    assert (sync.root, sync.created) == (out / "weight_sync", False)
    sync.previous = sync.root / "step-3"
    sync.previous.mkdir(parents=True)
    (sync.previous / "model.safetensors").write_bytes(b"w")
    sync.close()
    assert out.is_dir() and not (out / "weight_sync").exists()


# ----------------------------------------------------------------------------------------- API key
def asgi_status(app, path: str, headers=()) -> int:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_every_endpoint_but_health_needs_the_key(monkeypatch):
    from rlt.generation.server import RequireApiKey

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    monkeypatch.setenv("VLLM_API_KEY", "k" * 20)
    app = RequireApiKey(inner)
    for path in ("/collective_rpc", "/update_weights", "/init_weight_transfer_engine", "/sleep", "/v1/completions",
                 "/reset_prefix_cache", "/metrics"):
        assert asgi_status(app, path) == 401, path
        assert asgi_status(app, path, [(b"authorization", b"Bearer wrong")]) == 401, path
        assert asgi_status(app, path, [(b"authorization", b"Bearer " + b"k" * 20)]) == 200, path
    assert asgi_status(app, "/health") == 200


class _FakeService(http.server.BaseHTTPRequestHandler):
    """Answers /health; /v1/models with the status in the class attribute (another run's server: 401; an
    unauthenticated service: 200)."""

    models_status = 200

    def do_GET(self):
        self._answer(200 if self.path == "/health" else self.models_status, {"data": [{"id": "other-model"}]})

    def _answer(self, status: int, payload: dict):
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # a client that gave up (the hanging server below)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_service():
    servers = []

    def start(models_status: int):
        handler = type("Handler", (_FakeService,), {"models_status": models_status})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv.server_address[1]

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("models_status, why", [(200, "answers requests without this run's API key"),
                                                (401, "refuses this run's API key")])
def test_pool_refuses_a_service_that_is_not_the_runs_server(fake_service, models_status, why):
    from rlt.generation.client import ForeignServer, VLLMServerPool

    port = fake_service(models_status)
    with pytest.raises(ForeignServer, match=rf"port {port}\) {why}"):
        VLLMServerPool("127.0.0.1", port, api_key="run-key", connect_timeout=5)


class _HangingServer(_FakeService):
    """A vLLM server that holds the run's key ("run-key") and then hangs: once ``hung`` is set, every request
    (/health included) waits for ``release`` (a server stuck in a collective, say) instead of answering."""

    hung = threading.Event()
    release = threading.Event()

    def do_GET(self):
        if self.hung.is_set():
            self.release.wait(60)
        if self.path == "/health":
            return self._answer(200, {})
        keyed = self.headers.get("Authorization") == "Bearer run-key"
        self._answer(200 if keyed else 401, {"data": [{"id": "m"}]})

    def do_POST(self):
        self.hung.set()
        self.release.wait(60)
        self._answer(200, {"choices": []})


def test_a_hung_server_is_given_up_within_the_health_window_not_the_request_timeout():
    from rlt.generation.client import ServerDown, VLLMServerPool

    handler = type("Handler", (_HangingServer,), {"hung": threading.Event(), "release": threading.Event()})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        pool = VLLMServerPool("127.0.0.1", srv.server_address[1], api_key="run-key", connect_timeout=5,
                              request_timeout=30, health_interval=0.5, health_failures=2)
        t0 = time.monotonic()
        with pytest.raises(ServerDown, match="stopped answering during /v1/completions"):
            pool.generate([[1, 2, 3]], max_tokens=4)
        assert time.monotonic() - t0 < 10  # about health_interval * (health_failures + 1), not 30 s
    finally:
        handler.release.set()
        srv.shutdown()
        srv.server_close()


class _SlowServer(_FakeService):
    """Healthy all along; a POST takes 1.5 s (a long generation round)."""

    def do_POST(self):
        time.sleep(1.5)
        self._answer(200, {"ok": True})


def test_a_long_request_says_it_is_still_running(caplog):
    """A generation round of many minutes printed nothing until it ended; now a line every ``heartbeat`` s."""
    from rlt.generation.client import VLLMServerPool

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        pool = VLLMServerPool("127.0.0.1", srv.server_address[1], log_dir="/logs", api_key=None, connect_timeout=5,
                              health_interval=0.2, heartbeat=0.5)
        t0 = time.monotonic()
        with caplog.at_level("INFO", logger="rlt.generation.client"):
            assert pool._post(0, "/v1/completions", {}) == {"ok": True}
        elapsed = time.monotonic() - t0
        beats = [r.getMessage() for r in caplog.records if "still running after" in r.getMessage()]
        assert beats and beats[0].startswith(f"vLLM server http://127.0.0.1:{srv.server_address[1]} (log: "
                                             "/logs/server_0.log): /v1/completions still running after ")
        # one per 0.5 s heartbeat, not one per 0.2 s health poll (however long the request took here)
        assert len(beats) <= int(elapsed / 0.5) + 1, (len(beats), elapsed)
    finally:
        srv.shutdown()
        srv.server_close()


def test_servers_still_loading_are_named_every_heartbeat(caplog, tmp_path):
    from types import SimpleNamespace

    from rlt.generation.server import wait_until_healthy

    t0 = time.monotonic()
    server = SimpleNamespace(spec=SimpleNamespace(url="http://127.0.0.1:9", log_path=tmp_path / "server_0.log"),
                             proc=SimpleNamespace(poll=lambda: None), ready=lambda: time.monotonic() - t0 > 1.0)
    with caplog.at_level("INFO", logger="rlt.generation.server"):
        wait_until_healthy([server], timeout=30, poll=0.1, heartbeat=0.4)
    assert re.search(r"waiting for 1 vLLM server\(s\) to load \(\d+s of vllm_server_timeout=30s\): "
                     rf"http://127\.0\.0\.1:9 \(log {re.escape(str(tmp_path / 'server_0.log'))}\)", caplog.text)
    assert "vLLM server http://127.0.0.1:9 is ready" in caplog.text


def test_no_server_at_the_address_is_named_with_the_last_error():
    from rlt.generation.client import ServerDown, VLLMServerPool

    port = free_port()
    with pytest.raises(ServerDown, match=rf"no vLLM server answering at http://127\.0\.0\.1:{port} after 1s "
                                         r"\(vllm_server_timeout\); last try: ConnectionError"):
        VLLMServerPool("127.0.0.1", port, connect_timeout=1)


def test_an_ipv6_vllm_host_is_put_in_brackets():
    from rlt.generation.client import ServerDown, VLLMServerPool, server_url
    from rlt.generation.config import RolloutConfig

    assert server_url("::1", 8000) == "http://[::1]:8000" == server_url("[::1]", 8000)
    assert server_url("gpu-1", 8001) == "http://gpu-1:8001"
    assert RolloutConfig(vllm_host="fd00::7").vllm_host == "fd00::7"
    port = free_port()
    with pytest.raises(ServerDown, match=rf"no vLLM server answering at http://\[::1\]:{port} after 1s"):
        VLLMServerPool("::1", port, connect_timeout=1)


@pytest.mark.parametrize("host", ["http://localhost", "localhost:8000", "gpu-1/v1", " "])
def test_vllm_host_with_a_scheme_port_or_path_is_refused(host):
    from rlt.errors import ConfigError
    from rlt.generation.config import RolloutConfig

    with pytest.raises(ConfigError, match=r"vllm_host=.*: give a host name or address alone"):
        RolloutConfig(vllm_host=host)
    assert RolloutConfig(vllm_host="gpu-node-1.cluster").vllm_host == "gpu-node-1.cluster"


def test_a_port_bound_by_a_server_still_loading_is_in_use(tmp_path):
    """vLLM binds its port (SO_REUSEADDR, as uvicorn) but listens only once its engine has loaded: another run's
    check must see the port taken then too; a port with only TIME_WAIT leftovers is free."""
    import socket

    from rlt.generation.server import check_ports_free, only_time_wait

    with socket.socket() as loading:
        loading.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        loading.bind(("127.0.0.1", 0))   # bound, not listening
        port = loading.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"vllm_port: port {port} on 127\.0\.0\.1 is already in use .*maybe a "
                                              r"server still starting\); choose another vllm_port"):
            check_ports_free([("vllm_port", port)], "127.0.0.1")
    check_ports_free([("vllm_port", port)], "127.0.0.1")   # released: free again
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    table = tmp_path / "tcp"
    table.write_text(header + f"   0: 0100007F:{port:04X} 0100007F:9C40 06 00000000:00000000 03:00000AD0 00000000 0 0 0\n")
    assert only_time_wait(port, (str(table),)) and not only_time_wait(port + 1, (str(table),))
    table.write_text(table.read_text() + f"   1: 00000000:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 "
                                         "00000000 0 0 1\n")   # and one listening: in use
    assert not only_time_wait(port, (str(table),))


def test_a_servers_log_tail_is_its_own_not_an_earlier_runs(tmp_path, monkeypatch):
    from rlt.generation.server import ServerProcess, ServerSpec

    log = tmp_path / "server_0.log"
    log.write_text("".join(f"earlier run, line {k}\n" for k in range(30)))
    spec = ServerSpec(model="m", host="127.0.0.1", port=free_port(), seed=0, max_model_len=64, dtype="auto",
                      log_path=log)
    monkeypatch.setattr(ServerSpec, "command", lambda self: [sys.executable, "-c", "print('this run died early')"])
    server = ServerProcess(spec)
    server.proc.wait(timeout=60)
    server.stop()
    assert server.tail() == "this run died early"


def test_prefix_cache_reset_is_checked_and_retried():
    from rlt.generation.client import ServerDown, VLLMServerPool

    pool = VLLMServerPool.__new__(VLLMServerPool)
    pool.urls, pool.log_dir = ["http://127.0.0.1:1"], None
    answers = [{"success": False}, {"success": False}, {"success": True}]
    pool._post = lambda i, path, body, timeout=None: answers.pop(0)
    pool.reset_prefix_cache(0, tries=5, wait=0)
    assert answers == []   # asked until it succeeded
    pool._post = lambda i, path, body, timeout=None: {"success": False}
    with pytest.raises(ServerDown, match="did not drop its prefix cache after new weights"):
        pool.reset_prefix_cache(0, tries=3, wait=0)


def test_the_nccl_syncs_client_never_retries_a_post():
    """A weight update retried after its broadcast would leave the server waiting for a broadcast that never comes:
    trl's client retries POSTs on 5xx; rlt's does not (GETs still are)."""
    from rlt.generation.weight_sync import trl_client

    hits = {"POST": 0, "GET /v1/models": 0}

    class Handler(_FakeService):
        def do_GET(self):
            if self.path == "/v1/models":
                hits["GET /v1/models"] += 1
                if hits["GET /v1/models"] == 1:   # a passing 503: retried
                    return self._answer(503, {})
            self._answer(200, {"data": [{"id": "m"}]})

        def do_POST(self):
            hits["POST"] += 1
            self._answer(500, {"error": "engine busy"})

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = trl_client(f"http://127.0.0.1:{srv.server_address[1]}", free_port(), "key", connection_timeout=5)
        assert client.model == "m" and hits["GET /v1/models"] == 2
        with pytest.raises(Exception, match="Request failed: 500"):
            client._post(f"{client.base_url}/update_named_param", json={})
        assert hits["POST"] == 1
    finally:
        srv.shutdown()
        srv.server_close()


class _BlockedNcclClient:
    """A trl client whose broadcast blocks, as NCCL does when the server on the other end is gone; only the
    watchdog's on_fail releases it (after 30 s the test gives up)."""

    def __init__(self, release: threading.Event):
        self.release = release

    def update_named_params(self, metadata, named_params):
        list(named_params)
        assert self.release.wait(30), "the watchdog never fired: the broadcast would have blocked forever"


def blocked_nccl_sync(pool):
    from types import SimpleNamespace

    from rlt.generation.weight_sync import NcclWeightSync

    fired, release = [], threading.Event()
    sync = NcclWeightSync(pool, group_port=0, on_fail=lambda m: (fired.append(m), release.set()))
    sync.clients = [_BlockedNcclClient(release)]
    import torch

    trainer = SimpleNamespace(model=torch.nn.Linear(2, 2), accelerator=SimpleNamespace(
        is_main_process=True, unwrap_model=lambda m: m, wait_for_everyone=lambda: None))
    return sync, trainer, fired


def test_nccl_sync_blocked_on_a_dead_server_is_ended_by_the_watchdog():
    """A server that dies during an NCCL broadcast leaves the trainer blocked in NCCL (no exception can reach it):
    the watchdog polls /health and ends the sync within its health window."""
    from rlt.generation.client import VLLMServerPool

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeService)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    pool = VLLMServerPool("127.0.0.1", port, log_dir="/logs", api_key=None, connect_timeout=5,
                          request_timeout=600, health_interval=0.3, health_failures=2)
    pool.reset_prefix_cache = lambda i: None
    sync, trainer, fired = blocked_nccl_sync(pool)
    srv.shutdown()                          # the server dies; the broadcast to it blocks
    srv.server_close()
    t0 = time.monotonic()
    sync(trainer)
    assert time.monotonic() - t0 < 5        # about health_interval * health_failures, not request_timeout
    assert len(fired) == 1 and fired[0].startswith(f"vLLM server http://127.0.0.1:{port} (log: /logs/server_0.log) "
                                                   "stopped answering /health during the NCCL weight sync")


def test_nccl_sync_that_outlasts_the_request_timeout_is_ended(fake_service):
    from rlt.generation.client import VLLMServerPool

    pool = VLLMServerPool("127.0.0.1", fake_service(200), api_key=None, connect_timeout=5, request_timeout=1,
                          health_interval=0.2, health_failures=2)   # healthy all along: it is the deadline
    pool.reset_prefix_cache = lambda i: None
    sync, trainer, fired = blocked_nccl_sync(pool)
    sync(trainer)
    assert len(fired) == 1 and "the NCCL weight sync did not finish within 1 s (vllm_request_timeout)" in fired[0]


def test_the_watchdogs_exit_ends_a_process_whose_main_thread_is_blocked():
    """exit_process, called from the watchdog's thread, ends the process although the main thread sits in a
    blocking C call (a sleep standing in for NCCL), with status 1 and the reason in the log."""
    code = ("import logging, threading, time\n"
            "from rlt.generation.weight_sync import exit_process\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "threading.Timer(0.5, exit_process, ['server 0 stopped answering']).start()\n"
            "time.sleep(60)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and time.monotonic() - t0 < 30
    assert "ERROR:rlt.generation.weight_sync:server 0 stopped answering" in r.stderr


def test_trainer_killed_by_a_signal_exits_as_a_shell_reports_it():
    from types import SimpleNamespace

    from rlt.launch_with_server import wait_for_training

    trainer = SimpleNamespace(poll=lambda: -9)
    assert wait_for_training(trainer, [], poll=0) == 137


def test_a_server_dying_during_training_is_named_with_its_last_lines(caplog):
    from types import SimpleNamespace

    from rlt.launch_with_server import wait_for_training

    dead = SimpleNamespace(proc=SimpleNamespace(poll=lambda: 1, returncode=1), describe=lambda: "vLLM server X",
                           tail=lambda: "torch.OutOfMemoryError: CUDA out of memory")
    with caplog.at_level("ERROR", logger="rlt.launch"):
        assert wait_for_training(SimpleNamespace(poll=lambda: None), [dead], poll=0) == 1
    assert ("vLLM server X exited with code 1 during training: stopping training; its last lines:\n"
            "torch.OutOfMemoryError: CUDA out of memory") in caplog.text


def test_nccl_sync_without_cuda_is_one_line_at_check(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nccl is valid here")
    from rlt.config import build_train_settings, compose
    from rlt.trainers.grpo_run import validate_grpo

    cfg = compose("tiny_teacher_rlt", [f"output_dir={tmp_path}", "vllm_host=127.0.0.1", "vllm_weight_sync=nccl"])
    with pytest.raises(ConfigError, match="vllm_weight_sync=nccl needs CUDA; use filesystem"):
        validate_grpo(build_train_settings(cfg, 1), 1)


def test_server_engine_takes_the_rollout_settings(monkeypatch):
    """rlt.distill / rlt.eval through servers use the run's request timeout and log dir (they were the pool's
    defaults: an eval request past an hour failed whatever vllm_request_timeout said)."""
    from rlt.generation.client import API_KEY_ENV
    from rlt.generation.offline import make_engine

    handler = type("Handler", (_HangingServer,), {"hung": threading.Event(), "release": threading.Event()})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)   # holds "run-key"; not hung: no POST here
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv(API_KEY_ENV, "run-key")
    try:
        rollout = RolloutConfig(vllm_host="127.0.0.1", vllm_port=srv.server_address[1], vllm_request_timeout=20000.0,
                                vllm_log_dir="/tmp/somewhere")
        engine = make_engine("unused", rollout, 1024, 0, "auto")
        assert engine.pool.request_timeout == 20000.0 and engine.pool.log_dir == "/tmp/somewhere"
    finally:
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------------------- launcher refusals
def bad_rows_file(tmp_path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "What is 1+1?", "solution": "\\\\boxed{2}"}\n{"solution": "\\\\boxed{3}"}\n')
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bad_key", "bad_row", "not_loopback", "port_in_use"])
def test_launcher_refuses_before_starting_anything(tmp_path, fake_service, case):
    out = tmp_path / "out"
    port = free_port()
    extra, expect = {
        "bad_key": (["no_such_key=1"], r"unknown key 'no_such_key'"),
        "bad_row": ([f"dataset_id_or_path={bad_rows_file(tmp_path)}", "data_format=custom"],
                    r"bad\.jsonl, line 2: .*'question'"),
        "not_loopback": (["vllm_host=0.0.0.0"], r"vllm_host=0\.0\.0\.0: .*vllm_bind_all=true"),
        "port_in_use": ([], r"vllm_port: port (\d+) on 127\.0\.0\.1 is already in use .* choose another vllm_port"),
    }[case]
    if case == "port_in_use":
        port = fake_service(200)  # a service that answers /health, as a vLLM server would
    proc = run_cmd(LAUNCH + [f"output_dir={out}", f"vllm_port={port}", *extra], timeout=600, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("launch_with_server.sh: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and (m := re.search(expect, errors[0])), proc.stderr[-3000:]
    assert case != "port_in_use" or int(m.group(1)) == port   # the taken port is the one named
    assert "Traceback" not in proc.stderr and "starting vLLM server" not in proc.stderr + proc.stdout
    assert not out.exists()  # nothing written


# ----------------------------------------------------------------------------------------- launcher kills
class Run:
    """launch_with_server.sh in its own session, its log read line by line."""

    def __init__(self, out: Path, *extra: str):
        self.out = out
        self.proc = subprocess.Popen(
            LAUNCH + [f"output_dir={out}", "max_steps=500", "save_strategy=no", "logging_prob=0",
                      "save_completions_probability=0", f"vllm_port={free_port(2)}", *extra],   # + group port
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env=env_with_venv())
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()   # lines read by a thread, so a silent launcher cannot block a wait
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)   # end of output

    def wait_for(self, pattern: str, timeout: float = 900) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matched {pattern!r} within {timeout:.0f}s:\n{self.log[-5000:]}") from None
            if line is None:
                raise AssertionError(f"launcher ended before {pattern!r}:\n{self.log[-5000:]}")
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def groups(self) -> tuple[int, int]:
        server = int(re.search(r"vLLM server \S+: process group (\d+)", self.log).group(1))
        trainer = int(re.search(r"training: process group (\d+)", self.log).group(1))
        return server, trainer

    def finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        rc = self.proc.wait(timeout=timeout)
        while True:   # the rest of the output, until the pipe closes (a process left holding it: see the log)
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the launcher exited ({rc}) but its output stayed open {timeout:.0f}s (a "
                                     f"process it started holds it):\n{self.log[-5000:]}") from None
            if line is None:
                return rc
            self.lines.append(line)

    def cleanup(self):
        """After a failed test: let the launcher clean up (SIGTERM), then SIGKILL whatever is left of it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)   # its output goes on being read by the reader thread
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_until_weights_synced(tmp_path):
    """A launcher run that has generated, trained and synced weights once: (run, the processes under the server's
    guard, those under the trainer's guard (its ranks included), their shared-memory segments, the sync
    directory)."""
    run = Run(tmp_path / "o")
    sync_dir = Path(run.wait_for(r"weight sync through (\S+)").group(1))
    run.wait_for(r"step 2: \d+ completions .* generated by the vLLM server")
    server, trainer = (procs.Tree(pgid) for pgid in run.groups())
    assert len(server.scan()) >= 4 and len(ranks(trainer)) == 2  # guard, api server, engine, worker(s); 2 ranks
    segments = server.segments | trainer.segments
    assert any(Path(s).name.startswith("psm_") for s in segments), segments  # vLLM's message queues
    assert sync_dir.parent == Path("/dev/shm") and stat.S_IMODE(sync_dir.stat().st_mode) == 0o700
    return run, server, trainer, segments, sync_dir


def ranks(trainer: procs.Tree) -> dict[int, int]:
    """{RANK: pid} of the training processes (torchrun starts each in a session of its own)."""
    out = {}
    for pid in trainer.scan():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if b"rlt.train" in cmd and b"--check" not in cmd and rank is not None:
            out[rank] = pid
    return out


def assert_cleaned(run, server, trainer, segments, sync_dir, timeout=30):
    wait_until(lambda: all_gone(server, trainer), timeout, "every process under the server and trainer guards stops")
    wait_until(lambda: not [s for s in segments if Path(s).exists()], 10, f"segments removed: {shm_names(segments)}")
    assert not sync_dir.exists()


@pytest.mark.slow
def test_sigkill_of_the_launcher_stops_servers_and_training(tmp_path):
    run, *state = run_until_weights_synced(tmp_path)
    try:
        os.kill(run.proc.pid, signal.SIGKILL)
        run.finish(timeout=30)
        assert_cleaned(run, *state)
    finally:
        run.cleanup()


@pytest.mark.slow
def test_sigkill_of_a_server_fails_the_run_and_leaves_nothing(tmp_path):
    run, server, trainer, segments, sync_dir = run_until_weights_synced(tmp_path)
    try:
        os.killpg(server.root, signal.SIGKILL)  # the whole server group: guard, api server, engine, resource tracker
        killed = time.monotonic()
        rc = run.finish(timeout=90)
        assert rc != 0 and time.monotonic() - killed < 60
        # its death is named (not only a heartbeat line naming it): by the launcher, or by the trainer's requests
        assert re.search(r"vLLM server http://127\.0\.0\.1:\d+ \(log: \S+server_0\.log\):? (exited with code -?\d+ "
                         r"during training|stopped answering|failed during)", run.log), run.log[-3000:]
        assert_cleaned(run, server, trainer, segments, sync_dir, timeout=10)
        assert processes_mentioning(str(run.out)) == []
    finally:
        run.cleanup()


@pytest.mark.slow
def test_sigkill_of_a_rank_fails_the_run_and_leaves_nothing(tmp_path):
    run, server, trainer, segments, sync_dir = run_until_weights_synced(tmp_path)
    try:
        os.kill(ranks(trainer)[1], signal.SIGKILL)
        rc = run.finish(timeout=120)
        assert rc != 0
        assert_cleaned(run, server, trainer, segments, sync_dir, timeout=10)
    finally:
        run.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_launch_sh_leaves_no_rank(tmp_path, sig):
    """./launch.sh (SFT, 2 ranks that torchrun starts in sessions of their own) killed while training."""
    out = tmp_path / "o"
    proc = subprocess.Popen(["./launch.sh", "2", "cfgs/run_cfg/tiny_teacher_sft.yaml", f"output_dir={out}",
                             "max_steps=100000", "save_strategy=no"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env_with_venv())
    try:
        def live(pids):  # zombies (exited, not yet reaped) do not count
            out = []
            for pid in pids:
                try:
                    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        out.append(pid)
                except OSError:
                    pass
            return out

        def training_ranks():
            ranks = []
            for pid in live(processes_mentioning(str(out))):
                try:
                    if any(e.startswith(b"RANK=") for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                        ranks.append(pid)
                except OSError:
                    pass
            return ranks

        wait_until(lambda: len(training_ranks()) >= 2, 600, "two training ranks run")
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        wait_until(lambda: not live(processes_mentioning(str(out))), 45, f"no process of {out} is left")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in processes_mentioning(str(out)):
            with contextlib.suppress(ProcessLookupError):   # gone meanwhile: keep the test's own error
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------- distill
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_distill_leaves_no_engine_and_no_shared_memory(tmp_path, tiny_path, sig):
    proc = subprocess.Popen(
        [PY, "-m", "rlt.distill", f"teacher={tiny_path}", "dataset=rlt-countdown:400:0", f"output={tmp_path}/d.jsonl",
         "num_explanations=4", "missing_end_tag=penalise", "max_tokens=200", "max_prompt_length=512",
         "dtype=float32"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=env_with_venv())
    try:
        tree = procs.Tree(wait_until(lambda: _children(proc.pid), 60, "the guard starts")[0])
        wait_until(lambda: any(map(_is_engine, tree.scan())), 600, "vLLM's EngineCore runs")
        segments = wait_until(lambda: tree.scan() and tree.segments, 120, "vLLM maps its segments")
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        if sig != signal.SIGKILL:
            assert proc.returncode == 128 + sig, err[-3000:]
        wait_until(lambda: all_gone(tree), 30, "the engine and its workers stop")
        assert not [s for s in segments if Path(s).exists()], shm_names(segments)
    finally:
        if proc.poll() is None:
            proc.kill()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _is_engine(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore")
    except OSError:
        return False
