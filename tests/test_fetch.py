"""Image URLs in a manifest, served by a local http.server on 127.0.0.1 only."""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from svdbatch import run
from svdbatch.core.config import FetchConfig
from svdbatch.inputs.fetch import FetchError, UrlCache
from svdbatch.inputs.images import file_sha256
from svdbatch.inputs.manifest import read_manifest
from tests.conftest import make_cfg, write_csv

from .runfiles import failures_of, results_of, sidecar_file

SLOW_SECONDS = 3.0


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a handler still sleeping in /slow must not hold up shutdown

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.hits: collections.Counter = collections.Counter()
        self.flaky_left = 1  # /flaky answers 503 once, then the image

    def handle_error(self, request, client_address):
        pass  # the client gave up on /slow.png: a broken pipe here is expected

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@contextmanager
def serving(files: dict[str, bytes]) -> Iterator[ImageServer]:
    """An ImageServer answering on a thread while the block runs."""
    httpd = ImageServer(files)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


class Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.hits[self.path] += 1
        if self.path == "/slow.png":
            time.sleep(SLOW_SECONDS)
        if self.path == "/flaky.png" and self.server.flaky_left:
            self.server.flaky_left -= 1
            self.send_error(503)
            return
        body = self.server.files.get(self.path.replace("/flaky.png", "/a.png").replace("/slow.png", "/a.png"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path.endswith(".html") else "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(images):
    files = {"/a.png": images["a"].read_bytes(), "/page.html": b"<html>not an image</html>"}
    with serving(files) as httpd:
        yield httpd


QUICK = FetchConfig(timeout_s=0.5, retries=1, backoff_s=0.0, workers=4)


def test_fetch_retries_only_what_may_pass_and_caches_by_url(tmp_path, server, images):
    cache = UrlCache(tmp_path / "downloads", QUICK)
    path = cache.fetch(server.url("/a.png"))
    assert file_sha256(path) == file_sha256(images["a"])
    assert cache.fetch(server.url("/a.png")) == path and server.hits["/a.png"] == 1  # cached
    assert file_sha256(cache.fetch(server.url("/flaky.png"))) == file_sha256(images["a"])
    assert server.hits["/flaky.png"] == 2  # 503 is retried

    with pytest.raises(FetchError, match="HTTP 404"):
        cache.fetch(server.url("/missing.png"))
    assert server.hits["/missing.png"] == 1  # a 404 is not
    with pytest.raises(FetchError, match="after 2 attempts.*timed out"):
        cache.fetch(server.url("/slow.png"))
    assert server.hits["/slow.png"] == 2  # retries are bounded
    with pytest.raises(FetchError, match="not a readable image"):
        cache.fetch(server.url("/page.html"))
    assert not cache.path_for(server.url("/page.html")).exists()


def test_validation_checks_url_syntax_without_the_network(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["image"], [["http://127.0.0.1:9/never/contacted.png"], ["img/a.png"]])
    (url_item, local_item) = read_manifest(manifest).items
    assert url_item.id == "127.0.0.1__never__contacted" and url_item.url and url_item.image is None
    assert local_item.url is None


def test_url_rows_run_like_local_files_and_bad_urls_fail_only_their_item(tmp_path, server, images):
    manifest = write_csv(
        tmp_path / "m.csv",
        ["id", "image", "seed"],
        [
            ["local", "img/a.png", 5],
            ["remote", server.url("/a.png"), 5],
            ["missing", server.url("/nope.png"), 7],
            ["slow", server.url("/slow.png"), 8],
            ["html", server.url("/page.html"), 9],
        ],
    )
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"manifest={manifest}", f"run.dir={run_dir}", "fetch.timeout_s=0.5", "fetch.retries=1", "fetch.backoff_s=0")
    summary = run(cfg)
    assert (summary.done, summary.failed) == (2, 3)
    records = {r["id"]: r for r in results_of(run_dir)}
    assert records["remote"]["frames_sha256"] == records["local"]["frames_sha256"]  # same bytes, same frames
    sidecar = json.loads((sidecar_file(run_dir, "remote")).read_text())
    assert sidecar["image"]["url"] == server.url("/a.png") and sidecar["image"]["sha256"] == file_sha256(images["a"])
    assert Path(sidecar["image"]["path"]).parent.parent == run_dir / "downloads"
    failures = {f["id"]: f["error"] for f in failures_of(run_dir)}
    assert "HTTP 404" in failures["missing"] and "timed out" in failures["slow"] and "not a readable image" in failures["html"]

    # Resume: finished URL items come from the cache, without a single new request.
    hits_before = sum(server.hits.values())
    again = run(cfg)
    assert (again.done, again.skipped) == (0, 2) and again.failed == 3
    assert server.hits["/a.png"] == 1
    # Only the failed ones were tried again: 404 once, slow twice, the non-image once.
    assert sum(server.hits.values()) - hits_before == 1 + 2 + 1
