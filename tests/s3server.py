"""A real S3-protocol server on loopback for tests: moto's standalone server in its own process.

Everything that talks to it (s3fs in the driver, pyarrow's S3 filesystem inside Ray Train, Ray
workers in other processes) goes over HTTP to 127.0.0.1, exactly as it would to a real endpoint:
nothing in boto or fsspec is patched. Credentials and the endpoint travel the standard way, as
AWS_* environment variables, which is also how a cluster's jobs get them (see docs/cluster.md).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, what: str, log_path: Path) -> None:
    """Until `url` answers over HTTP with any status (a 401 from a server that wants a token means
    it is up); RuntimeError with the end of its log if `proc` exits or `timeout` seconds pass first."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start on {url} (log {log_path}): "
                                   f"{Path(log_path).read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.2)


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables that point boto/s3fs/pyarrow at `endpoint` (moto accepts any credentials)."""
    return {
        "AWS_ACCESS_KEY_ID": "kdcache-test",
        "AWS_SECRET_ACCESS_KEY": "kdcache-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # Read by botocore (hence s3fs) and by pyarrow's S3FileSystem (Ray Train storage).
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextlib.contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """Start `moto_server` on a free loopback port; yield its endpoint URL; stop it (by pid) after."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if exe is None:
        raise RuntimeError("moto_server is not installed in this environment: pip install -e '.[test]' "
                           "(the test extra lists moto[server])")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(Path(log_dir) / "moto.log", "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(endpoint + "/moto-api/", proc, 60, "moto_server", Path(log.name))
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    env = s3_env(endpoint)
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1").create_bucket(Bucket=name)


class FlakyProxy:
    """A TCP proxy on loopback in front of the S3 server that breaks connections on purpose.

    A share `rate` of connections (drawn from a seeded generator, so a run is repeatable) is cut once
    it has carried `cut_after` bytes of response: a client reading an object sees the response body
    end early and must reconnect. The other connections pass untouched, so a retry can succeed.
    `cuts` counts the connections cut, `bytes_down` the response bytes passed to clients. The faults are real network faults: the client's HTTP
    stack sees exactly what a dropped connection looks like.
    """

    def __init__(self, upstream: str, cut_after: int, rate: float = 0.5, seed: int = 0):
        import random
        import threading

        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.cut_after, self.rate, self._rng = cut_after, rate, random.Random(seed)
        self.cuts = self.connections = self.bytes_down = 0
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        import threading

        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return

        with self._lock:
            self.connections += 1
            limit = self.cut_after if self._rng.random() < self.rate else float("inf")

        def requests() -> None:  # client -> server, untouched
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    upstream.sendall(data)
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=requests, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                room = limit - sent
                if len(data) >= room:
                    client.sendall(data[:max(int(room), 0)])
                    with self._lock:
                        self.cuts += 1
                    break
                client.sendall(data)
                sent += len(data)
                with self._lock:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            # shutdown() first: it takes effect at once, even while the other thread is blocked in
            # recv() on the same socket (a bare close() would wait for it and leave the client hanging).
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.close()
