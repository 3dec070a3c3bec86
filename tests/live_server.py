"""Real servers for tests: an app on uvicorn in a thread, or a `captioner serve` command in its own process."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn


@contextmanager
def live_server(app, timeout: float = 30.0):
    """Serve `app` on 127.0.0.1; yields its base URL. The socket is bound first, so no port race."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@contextmanager
def server_process(command: list[str], timeout: float = 120.0, **popen):
    """Run a serve command with `--port` a free loopback port added; yields (base URL, process) once /healthz
    answers 200, and stops the process after. popen: subprocess.Popen's keywords (cwd, env, stderr=PIPE ...)."""
    with socket.socket() as s:  # the command binds the port itself: free now, taken by nothing else in a test run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*command, "--port", str(port)], **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"the server exited: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)
