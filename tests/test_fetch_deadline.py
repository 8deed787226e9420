"""Slow and trickling image servers (127.0.0.1 only): a total deadline per download
(fetch.deadline_s), and a signal honoured at once while planning downloads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from svdbatch.core.config import FetchConfig
from svdbatch.core.errors import exit_code_for_signal
from svdbatch.inputs.fetch import FetchError, UrlCache
from tests.conftest import FAST, REPO, make_image, write_csv

TRICKLE_EVERY_S = 0.05  # a byte this often: never idle for fetch.timeout_s


class TrickleServer(ThreadingHTTPServer):
    """/trickle: announces 10 MB, then sends one byte every TRICKLE_EVERY_S until the client
    leaves; /hang: accepts, then never answers; /ok.png: a real image at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, image: bytes):
        super().__init__(("127.0.0.1", 0), TrickleHandler)
        self.image = image
        self.requests: list[str] = []
        self.gone = threading.Event()  # set when the server shuts down: handlers stop

    def handle_error(self, request, client_address):
        pass  # the client gave up: a broken pipe here is expected

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class TrickleHandler(BaseHTTPRequestHandler):
    server: TrickleServer

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        if self.path == "/hang":
            self.server.gone.wait(60)
            return
        if self.path == "/ok.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.server.image)))
            self.end_headers()
            self.wfile.write(self.server.image)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(10**7))
        self.end_headers()
        body = self.server.image + bytes(10**7)
        for offset in range(len(body)):
            if self.server.gone.wait(TRICKLE_EVERY_S):
                return
            self.wfile.write(body[offset : offset + 1])
            self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def trickle(tmp_path) -> Iterator[TrickleServer]:
    image = make_image(tmp_path / "ok.png").read_bytes()
    httpd = TrickleServer(image)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.gone.set()
        httpd.shutdown()
        httpd.server_close()


def fetch_within(cache: UrlCache, url: str, seconds: float) -> Path | FetchError:
    """cache.fetch(url), which must end within `seconds` (else the test fails, not hangs)."""
    outcome: list[Path | BaseException] = []

    def go() -> None:
        try:
            outcome.append(cache.fetch(url))
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            outcome.append(exc)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"fetch({url}) still running after {seconds} s"
    if isinstance(outcome[0], FetchError):
        return outcome[0]
    assert isinstance(outcome[0], Path), outcome[0]
    return outcome[0]


def test_a_trickling_server_is_given_up_at_the_download_deadline(tmp_path, trickle):
    cache = UrlCache(tmp_path / "downloads", FetchConfig(timeout_s=5, deadline_s=1.5, retries=3, backoff_s=0))
    start = time.monotonic()
    error = fetch_within(cache, trickle.url("/trickle.png"), 20)
    took = time.monotonic() - start
    assert isinstance(error, FetchError), error
    assert "fetch.deadline_s=1.5" in str(error) and 1.4 < took < 4, (str(error), took)
    # The deadline covers the whole download: no second attempt starts after it.
    assert trickle.requests.count("/trickle.png") == 1
    assert not (tmp_path / "downloads").exists()


def test_the_deadline_covers_a_server_that_never_answers_and_its_retries(tmp_path, trickle):
    cache = UrlCache(tmp_path / "downloads", FetchConfig(timeout_s=0.6, deadline_s=1.5, retries=10, backoff_s=0.2))
    start = time.monotonic()
    error = fetch_within(cache, trickle.url("/hang"), 20)
    assert isinstance(error, FetchError) and time.monotonic() - start < 3, error
    assert "timed out" in str(error) and 1 <= trickle.requests.count("/hang") <= 3


def test_a_quick_server_is_unaffected(tmp_path, trickle):
    cache = UrlCache(tmp_path / "downloads", FetchConfig(deadline_s=5))
    path = fetch_within(cache, trickle.url("/ok.png"), 20)
    assert isinstance(path, Path) and path.read_bytes() == trickle.image


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_downloading_stops_the_run_within_seconds(tmp_path, trickle, sig):
    """The default settings (20 s per read, 120 s per download, 2 retries) would keep a
    trickling download going for minutes: the first signal ends it at once."""
    for n in range(2):
        make_image(tmp_path / "img" / f"{n}.png", seed=n)
    rows = [["a", trickle.url("/trickle.png"), 1], ["b", trickle.url("/hang"), 2], ["c", "img/0.png", 3]]
    manifest = write_csv(tmp_path / "m.csv", ["id", "image", "seed"], rows)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "svdbatch", f"manifest={manifest}", f"hydra.run.dir={run_dir}", *FAST, "run.progress=false"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    try:
        deadline = time.monotonic() + 120
        while not {"/trickle.png", "/hang"} <= set(trickle.requests):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started downloading"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside both downloads
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == exit_code_for_signal(sig), err[-3000:]
    assert took < 5, f"exited {took:.1f} s after the signal"
    assert out.strip() == "interrupted before any item started; run the same command to resume"
    assert "Traceback" not in err, err[-3000:]
    downloads = run_dir / "downloads"
    assert not downloads.exists() or not list(downloads.iterdir())  # nothing of a cancelled download kept
