"""Manifest images given as http(s) URLs: download once per run dir, then treat as local files.

A URL is fetched with a timeout per socket operation, a total deadline for the whole download
(every attempt and wait: a server trickling bytes cannot stall planning), and a bounded
number of retries (only for errors that may pass: connection problems, timeouts, HTTP
408/429/5xx), checked to be a decodable image, and cached under ``<run dir>/downloads/`` by a
hash of the URL. From then on its bytes are hashed and keyed exactly like a local file's, and
a resumed run reads the cache instead of the network. A URL that cannot be fetched fails only
its own item.

Downloads run on daemon threads while the calling thread waits: a signal there (stops.py
raises in the main thread) cancels them at once, shutting their sockets, instead of waiting
for the slowest server; nothing of a cancelled download is cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import math
import queue
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.config import FetchConfig
from svdbatch.core.params import DEFAULT_MAX_IMAGE_PIXELS
from svdbatch.inputs.images import ImageProblem, open_header, open_image, pixels_problem
from svdbatch.rundir.layout import BUCKET_CHARS

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CACHED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
READ_CHUNK = 64 * 1024
# While downloading, the image header is parsed from the bytes so far until it gives a size
# (a PNG's is in its first 33 bytes; a JPEG's follows its EXIF/ICC segments). Past this,
# stop trying: the size is checked again from the whole file before decoding.
HEADER_SCAN_BYTES = 4 * 1024 * 1024
# How often the waiting thread looks at the downloads (deadlines, completion).
WATCH_S = 0.1


class FetchError(RuntimeError):
    pass


class Cancelled(Exception):
    """The download was cancelled (a signal stopped the run): not an error of the URL."""


def is_url(ref: str) -> bool:
    return "://" in ref


def url_problem(ref: str) -> str | None:
    """Syntax only: validation must not need the network."""
    try:
        parts = urlsplit(ref)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme.lower() not in URL_SCHEMES:
        return f"only http:// and https:// URLs are supported (got {parts.scheme}://)"
    if not parts.hostname:
        return "URL has no host"
    if any(ch.isspace() for ch in ref):
        return "URL must not contain spaces (percent-encode them as %20)"
    return None


def check_fetch_config(config: FetchConfig) -> list[str]:
    problems = []
    for name in ("timeout_s", "deadline_s"):
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            problems.append(f"fetch.{name}: must be > 0 and finite, got {value}")
    for name in ("retries", "backoff_s"):
        value = getattr(config, name)
        if not (value >= 0 and math.isfinite(value)):  # NaN compares false both ways
            problems.append(f"fetch.{name}: must be >= 0 and finite, got {value}")
    for name in ("max_bytes", "workers"):
        if getattr(config, name) < 1:
            problems.append(f"fetch.{name}: must be >= 1, got {getattr(config, name)}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in config.user_agent):  # http.client raises on them mid-download
        problems.append(f"fetch.user_agent: must not contain control characters such as newlines, got {config.user_agent!r}")
    return problems


class Attempt:
    """One HTTP request in flight: its socket, so that another thread can end it at once
    (shutting a socket wakes a thread blocked in connect's aftermath or in a read)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.ended: str | None = None  # why it was ended from outside: cancelled, or deadline
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.ended:
                _shut(sock)

    def end(self, why: str) -> None:
        with self._lock:
            if self.ended is None:
                self.ended = why
                if self._sock is not None:
                    _shut(self._sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


_current = threading.local()  # the Attempt of the request this thread is making


def _tracked(base: type[http.client.HTTPConnection]) -> Any:
    """`base` whose socket, once connected, is handed to the thread's current Attempt."""

    class Tracked(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            super().connect()
            attempt = getattr(_current, "attempt", None)
            if attempt is not None:
                attempt.attach(self.sock)

    return Tracked


_TrackedHTTP = _tracked(http.client.HTTPConnection)
_TrackedHTTPS = _tracked(http.client.HTTPSConnection)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_TrackedHTTP, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self) -> None:
        self.ssl_context = ssl.create_default_context()
        super().__init__(context=self.ssl_context)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_TrackedHTTPS, req, context=self.ssl_context)


class _Batch:
    """The URLs of one fetch_many call, and what became of each."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        for url in urls:
            self.todo.put(url)
        self.results: dict[str, Path | Exception] = {}
        self.finished = threading.Event()
        self._lock = threading.Lock()

    def record(self, url: str, result: Path | Exception) -> None:
        with self._lock:
            self.results[url] = result
            if len(self.results) == len(self.urls):
                self.finished.set()


class UrlCache:
    """Downloads into `root`, one file per URL, written atomically."""

    def __init__(self, root: Path, config: FetchConfig, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.root = Path(root)
        self.config = config
        self.max_pixels = max_pixels  # run.max_image_pixels, checked from the header as bytes arrive
        # Proxies (http_proxy, ...) and redirects as urlopen; our handlers only track sockets.
        self._opener = urllib.request.build_opener(_HTTPHandler(), _HTTPSHandler())
        self._cancelled = threading.Event()
        self._attempts: set[Attempt] = set()
        self._lock = threading.Lock()

    def path_for(self, url: str) -> Path:
        """downloads/<3 hex>/<sha256 of the url>.<ext>: grouped like a run dir's items
        (rundir/layout.py), so a million URLs never make one folder of a million files."""
        name = self._name(url)
        return self.root / name[:BUCKET_CHARS] / name

    @staticmethod
    def _name(url: str) -> str:
        suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
        return hashlib.sha256(url.encode()).hexdigest()[:40] + (suffix if suffix in CACHED_SUFFIXES else ".img")

    def fetch(self, url: str) -> Path:
        """The cached file for `url`, downloading it first if needed. Raises FetchError."""
        result = self.fetch_many([url])[url]
        if isinstance(result, FetchError):
            raise result
        return result

    def fetch_many(self, urls: Iterable[str]) -> dict[str, Path | FetchError]:
        """Fetch distinct URLs in parallel; each maps to its cached path or its error. An
        exception in the waiting thread (stops.Interrupted, KeyboardInterrupt) cancels every
        download in flight and propagates at once."""
        batch = _Batch(list(dict.fromkeys(urls)))
        if not batch.urls:
            return {}
        # Daemon threads, not a pool: a cancelled download stuck in connect() must not
        # hold up the interpreter's exit.
        for number in range(max(1, min(self.config.workers, len(batch.urls)))):
            threading.Thread(target=self._work, args=(batch,), name=f"svdbatch-fetch-{number}", daemon=True).start()
        try:
            while not batch.finished.wait(WATCH_S):
                self._end_overdue()
        except BaseException:
            self.cancel()
            raise
        for result in batch.results.values():
            if not isinstance(result, (Path, FetchError)):
                raise result  # not the URL's fault (a full disk): the caller's to handle
        return {url: batch.results[url] for url in batch.urls}  # type: ignore[misc]

    def _work(self, batch: _Batch) -> None:
        """A download thread: URLs of `batch` until none is left or the batch is cancelled."""
        while not self._cancelled.is_set():
            try:
                url = batch.todo.get_nowait()
            except queue.Empty:
                return
            result: Path | Exception
            try:
                result = self._fetch_one(url)
            except Cancelled:
                return
            except Exception as exc:  # FetchError, or one for the caller (a full disk)
                result = exc
            batch.record(url, result)

    def cancel(self) -> None:
        """End every download in flight now; the ones not started never start."""
        self._cancelled.set()
        with self._lock:
            for attempt in self._attempts:
                attempt.end("cancelled")

    def _end_overdue(self) -> None:
        now = time.monotonic()
        with self._lock:
            for attempt in self._attempts:
                if now >= attempt.deadline:
                    attempt.end("deadline")

    def _fetch_one(self, url: str) -> Path:
        target = self.path_for(url)
        if target.is_file():
            return target
        flat = self.root / self._name(url)  # where run dirs of older versions kept it
        if flat.is_file():
            return flat
        data = self._download(url)
        try:
            with open_image(io.BytesIO(data), self.max_pixels) as image:  # the size again, before decoding
                image.load()
        except ImageProblem as exc:
            raise FetchError(f"{url}: {exc}") from None
        except Exception as exc:  # any decoder error means "not an image we can use"
            raise FetchError(f"{url}: not a readable image ({len(data)} bytes): {exc}") from None
        if self._cancelled.is_set():
            raise Cancelled()
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        return target

    def _download(self, url: str) -> bytes:
        attempts = 1 + max(0, self.config.retries)
        deadline = time.monotonic() + self.config.deadline_s
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                return self._get(url, deadline)
            except ImageProblem as exc:  # too many pixels: the same answer on every attempt
                raise FetchError(f"{url}: {exc}") from None
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} {exc.reason}"
                if exc.code not in RETRY_STATUS:
                    break  # a 404 or 403 will not get better
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if self._cancelled.is_set():
                raise Cancelled()
            wait = self.config.backoff_s * 2 ** (attempt - 1)
            if attempt < attempts and time.monotonic() + wait >= deadline:
                last += f"; no time left for another attempt (fetch.deadline_s={self.config.deadline_s:g})"
                break
            if attempt < attempts and self._cancelled.wait(wait):
                raise Cancelled()
        tries = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
        raise FetchError(f"{url}: download failed {tries}: {last}")

    @contextlib.contextmanager
    def _attempt(self, deadline: float) -> Iterator[Attempt]:
        attempt = Attempt(deadline)
        with self._lock:
            self._attempts.add(attempt)
        _current.attempt = attempt
        try:
            yield attempt
        finally:
            _current.attempt = None
            with self._lock:
                self._attempts.discard(attempt)

    def _get(self, url: str, deadline: float) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": self.config.user_agent})
        buffer = bytearray()
        expected: str | None = None  # Content-Length, when the server says
        with self._attempt(deadline) as attempt:
            try:
                # The socket timeout bounds connecting and each read; the watcher (fetch_many)
                # ends the attempt at the deadline, however the server dribbles.
                timeout = max(0.001, min(self.config.timeout_s, deadline - time.monotonic()))
                with self._opener.open(request, timeout=timeout) as response:
                    expected = response.headers.get("Content-Length")
                    self._read_body(response, buffer)
            except (OSError, http.client.HTTPException, ValueError):
                if attempt.ended is None:
                    raise
            if attempt.ended == "cancelled":
                raise Cancelled()
            if attempt.ended == "deadline":
                raise TimeoutError(f"gave up after fetch.deadline_s={self.config.deadline_s:g} s ({len(buffer)} bytes so far)")
        if len(buffer) > self.config.max_bytes:
            raise FetchError(f"{url}: larger than fetch.max_bytes={self.config.max_bytes}")
        if expected is not None and expected.isdigit() and len(buffer) < int(expected):
            raise ConnectionError(f"the connection closed after {len(buffer)} of {expected} bytes")
        return bytes(buffer)

    def _read_body(self, response: http.client.HTTPResponse, buffer: bytearray) -> None:
        """Into `buffer`, up to one byte past fetch.max_bytes; raises ImageProblem as soon as
        the header gives a size over run.max_image_pixels."""
        size_known = self.max_pixels is None
        while len(buffer) <= self.config.max_bytes:
            # read1: whatever has arrived (read(n) would wait for all n bytes).
            chunk = response.read1(min(READ_CHUNK, self.config.max_bytes + 1 - len(buffer)))
            if not chunk:
                return
            buffer += chunk
            if not size_known and len(buffer) <= HEADER_SCAN_BYTES:
                size = header_size(bytes(buffer))
                if size is not None:
                    size_known = True
                    why = pixels_problem(size, self.max_pixels)
                    if why:  # stop now: neither the rest of the file nor its decoding is wanted
                        raise ImageProblem(why)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the start of an image file, or None while the header is incomplete
    (or not an image). Image.open reads headers only; nothing is decoded here."""
    try:
        with open_header(io.BytesIO(data)) as image:  # without Pillow's global limit, as open_image
            return image.size
    except Exception:  # incomplete header, not an image yet: keep reading
        return None
