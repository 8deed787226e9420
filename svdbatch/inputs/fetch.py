"""Manifest images given as http(s) URLs: download once per run dir, then treat as local files.

A URL is fetched with a timeout per socket operation and a bounded number of retries (only
for errors that may pass: connection problems, timeouts, HTTP 408/429/5xx), checked to be a
decodable image, and cached under ``<run dir>/downloads/`` by a hash of the URL. From then on
its bytes are hashed and keyed exactly like a local file's, and a resumed run reads the cache
instead of the network. A URL that cannot be fetched fails only its own item.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from PIL import Image

from svdbatch.core.atomic import atomic_write_bytes
from svdbatch.core.config import FetchConfig
from svdbatch.core.params import DEFAULT_MAX_IMAGE_PIXELS
from svdbatch.inputs.images import ImageProblem, open_image, pixels_problem

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CACHED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
READ_CHUNK = 64 * 1024
# While downloading, the image header is parsed from the bytes so far until it gives a size
# (a PNG's is in its first 33 bytes; a JPEG's follows its EXIF/ICC segments). Past this,
# stop trying: the size is checked again from the whole file before decoding.
HEADER_SCAN_BYTES = 4 * 1024 * 1024


class FetchError(RuntimeError):
    pass


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
    if not (config.timeout_s > 0 and math.isfinite(config.timeout_s)):
        problems.append(f"fetch.timeout_s: must be > 0 and finite, got {config.timeout_s}")
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


class UrlCache:
    """Downloads into `root`, one file per URL, written atomically."""

    def __init__(self, root: Path, config: FetchConfig, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.root = Path(root)
        self.config = config
        self.max_pixels = max_pixels  # run.max_image_pixels, checked from the header as bytes arrive

    def path_for(self, url: str) -> Path:
        suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
        name = hashlib.sha256(url.encode()).hexdigest()[:40]
        return self.root / (name + (suffix if suffix in CACHED_SUFFIXES else ".img"))

    def fetch(self, url: str) -> Path:
        """The cached file for `url`, downloading it first if needed. Raises FetchError."""
        target = self.path_for(url)
        if target.is_file():
            return target
        data = self._download(url)
        try:
            with open_image(io.BytesIO(data), self.max_pixels) as image:  # the size again, before decoding
                image.load()
        except ImageProblem as exc:
            raise FetchError(f"{url}: {exc}") from None
        except Exception as exc:  # any decoder error means "not an image we can use"
            raise FetchError(f"{url}: not a readable image ({len(data)} bytes): {exc}") from None
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        return target

    def fetch_many(self, urls: Iterable[str]) -> dict[str, Path | FetchError]:
        """Fetch distinct URLs in parallel; each maps to its cached path or its error."""
        unique = list(dict.fromkeys(urls))

        def one(url: str) -> Path | FetchError:
            try:
                return self.fetch(url)
            except FetchError as exc:
                return exc

        if not unique:
            return {}
        with ThreadPoolExecutor(max_workers=max(1, min(self.config.workers, len(unique)))) as pool:
            return dict(zip(unique, pool.map(one, unique), strict=False))

    def _download(self, url: str) -> bytes:
        attempts = 1 + max(0, self.config.retries)
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                return self._get(url)
            except ImageProblem as exc:  # too many pixels: the same answer on every attempt
                raise FetchError(f"{url}: {exc}") from None
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} {exc.reason}"
                if exc.code not in RETRY_STATUS:
                    break  # a 404 or 403 will not get better
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < attempts:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
        tries = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
        raise FetchError(f"{url}: download failed {tries}: {last}")

    def _get(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": self.config.user_agent})
        buffer = bytearray()
        size_known = self.max_pixels is None
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
            while len(buffer) <= self.config.max_bytes:
                chunk = response.read(min(READ_CHUNK, self.config.max_bytes + 1 - len(buffer)))
                if not chunk:
                    break
                buffer += chunk
                if not size_known and len(buffer) <= HEADER_SCAN_BYTES:
                    size = header_size(bytes(buffer))
                    if size is not None:
                        size_known = True
                        why = pixels_problem(size, self.max_pixels)
                        if why:  # stop now: neither the rest of the file nor its decoding is wanted
                            raise ImageProblem(why)
        if len(buffer) > self.config.max_bytes:
            raise FetchError(f"{url}: larger than fetch.max_bytes={self.config.max_bytes}")
        return bytes(buffer)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the start of an image file, or None while the header is incomplete
    (or not an image). Image.open reads headers only; nothing is decoded here."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # incomplete header, not an image yet: keep reading
        return None
