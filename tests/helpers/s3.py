"""A real S3-compatible server on 127.0.0.1 for the storage tests and the loader benchmark: moto's
server (its WSGI app under werkzeug's threaded server, as `moto_server` runs it) in a subprocess of
its own (so that it does not share the GIL with the readers it serves), with faults injected on
request.

    with S3Server() as s3:              # binds a free port; dummy credentials
        os.environ.update(s3.env)       # what any boto/s3fs client (and our subprocesses) need
        s3.faults(error_every=3)        # every 3rd matching GET answers 500 InternalError
        s3.faults(drop_every=4)         # ... or sends half its body, then drops the connection
        s3.faults(stall_every=2, stall_s=5)   # ... or waits 5 s before answering
        s3.injected()                   # {"error": n, "drop": n, "stall": n} since faults() was set

Faults apply to GET requests whose path contains `match` (default ".tar": shard reads, not
listings or side files), counted from 1 in arrival order; `faults()` with no argument turns them off.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

CONTROL_PATH = "/__faults__"
REPO = Path(__file__).resolve().parents[2]


class FaultInjector:
    """WSGI middleware in front of moto's app: the control route plus the injected faults."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.rules: dict = {}
        self.matched = 0
        self.counts: Counter = Counter()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == CONTROL_PATH:
            return self._control(environ, start_response)
        fault = self._fault(environ)
        if fault == "error":
            start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
            return [b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                    b"<Message>injected by tests/helpers/s3.py</Message></Error>"]
        if fault == "stall":
            time.sleep(self.rules.get("stall_s", 5))
        body = self.app(environ, start_response)
        return self._cut(body) if fault == "drop" else body

    def _fault(self, environ) -> str | None:
        rules = self.rules
        if environ["REQUEST_METHOD"] != "GET" or rules.get("match", ".tar") not in environ["PATH_INFO"]:
            return None
        with self.lock:
            self.matched += 1
            for fault in ("error", "drop", "stall"):
                every = rules.get(f"{fault}_every", 0)
                if every and self.matched % every == 0:
                    self.counts[fault] += 1
                    return fault
        return None

    @staticmethod
    def _cut(body):
        """Half the body under the full Content-Length, then an exception: the server closes the
        connection mid-response, as a dropped connection looks to the client."""
        data = b"".join(body)
        yield data[:len(data) // 2]
        raise ConnectionAbortedError("fault injected: connection dropped")

    def _control(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            with self.lock:
                self.rules = json.loads(environ["wsgi.input"].read(size) or b"{}")
                self.matched, self.counts = 0, Counter()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(dict(self.counts)).encode()]


def serve(port: int = 0) -> None:
    """Run the server in this process; prints the bound port on stdout first."""
    import logging

    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                                create_backend_app)
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = FaultInjector(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


class S3Server:
    """The server as a subprocess on a free port of 127.0.0.1 (see the module docstring)."""

    def __init__(self, start_timeout_s: float = 60):
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def __enter__(self) -> "S3Server":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.s3"], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        port = _first_line(self.process, self.start_timeout_s)
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()

    @property
    def env(self) -> dict[str, str]:
        """Client settings: dummy credentials, this endpoint, and no user config files."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def faults(self, **rules) -> None:
        self._control(rules)

    def injected(self) -> dict[str, int]:
        with urllib.request.urlopen(self.endpoint + CONTROL_PATH, timeout=10) as response:
            return json.load(response)

    def _control(self, rules: dict) -> dict:
        request = urllib.request.Request(self.endpoint + CONTROL_PATH, data=json.dumps(rules).encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


def _first_line(process: subprocess.Popen, timeout_s: float) -> int:
    """The port the server printed, or a clear failure (no hang) if it never starts."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not result or not result[0].strip():
        process.kill()
        raise RuntimeError(f"the S3 test server did not start within {timeout_s:g} s")
    return int(result[0])


def s3_filesystem():
    """A fresh s3fs filesystem for the current AWS_* environment (fsspec caches instances by
    arguments, not by environment: a server on another port needs a new one)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(skip_instance_cache=True)


def upload_folder(fs, folder: Path, url: str) -> str:
    """Every file of `folder` (not recursive) to `url` (s3://bucket/prefix); returns `url`."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            fs.put_file(str(path), f"{url}/{path.name}")
    return url


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
