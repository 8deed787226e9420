"""The item sidecar (``<run dir>/items/<id>.json``) as one typed record.

A sidecar says everything about one finished item: its manifest row, source image,
preprocessing, generation parameters and seed, the model and software that made it, the
written file and the timings. Its rename into place is what makes an item done
(store.py owns where it lives and the write); this module owns what is in it: the fields,
their JSON form (``to_json``, the exact bytes written, so the results line's
``sidecar_bytes`` and verify's checks hold) and reading one back (``Sidecar.read``), which
refuses a truncated, foreign or older record with a ``SidecarError`` naming the file and
the field.

Sub-records other modules own stay plain JSON objects here: ``params``
(params.GenParams.as_dict), ``preprocess`` (images.Preprocess.as_dict), ``model``
(models.ModelIdentity.as_dict), ``memory`` (models.LoadedPipeline.memory_record),
``config`` (the run's resolved config), ``versions``, ``output.settings`` and
``output.encoder`` (outputs.py), ``row.overrides`` and ``row.meta`` (the manifest's).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from svdbatch.core.params import GenParams, Preprocess

SCHEMA = 1  # bump when a field changes meaning; a reader refuses other schemas
DONE = "done"  # the only status written today: the item is finished

Json = dict[str, Any]


class SidecarError(ValueError):
    """A sidecar that cannot be read as this version's record: `problem` says why (the
    field), `where` is the file; `parse` is true when the bytes are not JSON at all."""

    def __init__(self, where: Any, problem: str, parse: bool = False):
        self.where, self.problem, self.parse = where, problem, parse
        what = f"does not parse: {problem}" if parse else f"not an svdbatch item record ({problem})"
        super().__init__(f"{where}: {what}" if where else what)


def body_bytes(record: Mapping[str, Any]) -> bytes:
    """A sidecar's bytes on disk: indented, keys sorted, one trailing newline. Never NaN or
    Infinity (not JSON: other readers refuse the file); manifest validation refuses
    non-finite meta values, so this raising is a bug, not input."""
    return json.dumps(record, allow_nan=False, indent=2, sort_keys=True, default=str).encode() + b"\n"


# -- reading helpers: every check names the field ------------------------------------------
_MISSING = object()


class _Reader:
    """Typed access to one JSON object, `name` being its dotted place in the sidecar."""

    def __init__(self, data: Any, name: str):
        if not isinstance(data, dict):
            raise SidecarError(None, f"{name or 'the record'} is not a JSON object ({type(data).__name__})")
        self.data, self.name = data, name

    def _where(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def get(self, key: str, kinds: tuple[type, ...], required: bool = True, default: Any = None) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if required:
                raise SidecarError(None, f"field {self._where(key)!r} is missing")
            return default
        if value is None and not required:
            return None
        # bool is an int to Python, never to a sidecar.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(kind.__name__ for kind in kinds)
            raise SidecarError(None, f"field {self._where(key)!r} is {type(value).__name__} {value!r:.60}, expected {wanted}")
        return value

    def text(self, key: str, required: bool = True) -> Any:
        return self.get(key, (str,), required)

    def integer(self, key: str, required: bool = True) -> Any:
        return self.get(key, (int,), required)

    def number(self, key: str, required: bool = True) -> Any:
        return self.get(key, (int, float), required)

    def obj(self, key: str, required: bool = True) -> Any:
        return self.get(key, (dict,), required)

    def sub(self, key: str) -> _Reader:
        return _Reader(self.obj(key), self._where(key))


# -- the record -------------------------------------------------------------------------
@dataclass(frozen=True)
class SidecarRow:
    """The manifest row the item came from, as the manifest read it (manifest.Item.row_record)."""

    manifest: str
    line: int
    id: str
    image: str  # the image reference as written in the manifest (path or URL)
    seed: int
    seed_derived: bool
    overrides: Json
    resize: str | None
    meta: Json  # the row's meta_* columns, carried untouched into metadata.jsonl

    def to_dict(self) -> Json:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, name: str = "row") -> SidecarRow:
        r = _Reader(data, name)
        return cls(
            manifest=r.text("manifest"),
            line=r.integer("line"),
            id=r.text("id"),
            image=r.text("image"),
            seed=r.integer("seed"),
            seed_derived=r.get("seed_derived", (bool,)),
            overrides=r.obj("overrides"),
            resize=r.text("resize", required=False),
            meta=r.obj("meta"),
        )


@dataclass(frozen=True)
class SidecarImage:
    """The source image: where it was read from, its bytes' hash (part of the key), and
    what lets the next plan reuse the hash while the file is unchanged."""

    path: str
    sha256: str
    url: str | None  # the image URL it was downloaded from, if any
    bytes: int | None
    mtime_ns: int | None
    size: tuple[int, int] | None  # the source's (width, height) before preprocessing

    def to_dict(self) -> Json:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "url": self.url,
            "bytes": self.bytes,
            "mtime_ns": self.mtime_ns,
            "size": list(self.size) if self.size is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Any, name: str = "image") -> SidecarImage:
        r = _Reader(data, name)
        size = r.get("size", (list,), required=False)
        if size is not None and (len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in size)):
            raise SidecarError(None, f"field '{name}.size' is {size!r:.60}, expected [width, height]")
        return cls(
            path=r.text("path"),
            sha256=r.text("sha256"),
            url=r.text("url", required=False),
            bytes=r.integer("bytes", required=False),
            mtime_ns=r.integer("mtime_ns", required=False),
            size=tuple(size) if size is not None else None,
        )


@dataclass(frozen=True)
class SidecarOutput:
    """The written file (or folder of PNG frames), relative to the run dir, and what it must
    decode to; `settings` is what its output key hashes (outputs.output_settings)."""

    path: str
    format: str
    fps: int | float
    settings: Json
    bytes: int
    sha256: str | None  # None only in records of an older svdbatch: not verifiable
    encoder: Json
    frames: int
    height: int
    width: int

    def to_dict(self) -> Json:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, name: str = "output") -> SidecarOutput:
        r = _Reader(data, name)
        return cls(
            path=r.text("path"),
            format=r.text("format"),
            fps=r.number("fps"),
            settings=r.obj("settings"),
            bytes=r.integer("bytes"),
            sha256=r.text("sha256", required=False),
            encoder=r.obj("encoder"),
            frames=r.integer("frames"),
            height=r.integer("height"),
            width=r.integer("width"),
        )


@dataclass(frozen=True)
class Timings:
    """Seconds spent on the item. A generated item has load_image_s, generate_s and
    write_s; one reused from another run dir has reuse_s and that item's timings as
    `source`. Only the fields an item has are written."""

    total_s: float
    load_image_s: float | None = None
    generate_s: float | None = None
    write_s: float | None = None
    reuse_s: float | None = None
    source: Timings | None = None

    @classmethod
    def generated(cls, load_image_s: float, generate_s: float, write_s: float) -> Timings:
        return cls(load_image_s + generate_s + write_s, load_image_s, generate_s, write_s)

    def to_dict(self) -> Json:
        out: Json = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.to_dict() if isinstance(value, Timings) else value
        return out

    @classmethod
    def from_dict(cls, data: Any, name: str = "timings") -> Timings:
        r = _Reader(data, name)
        source = r.get("source", (dict,), required=False)
        return cls(
            total_s=r.number("total_s"),
            load_image_s=r.number("load_image_s", False),
            generate_s=r.number("generate_s", False),
            write_s=r.number("write_s", False),
            reuse_s=r.number("reuse_s", False),
            source=cls.from_dict(source, f"{name}.source") if source is not None else None,
        )


@dataclass(frozen=True)
class Attempt:
    """One generation of an item (core/quality.py): its seed (attempt_seed of the row seed),
    its signals, the rules it broke (empty: not a dud) and the rescue step it ran at."""

    attempt: int
    seed: int
    signals: Json
    verdict: list[str]
    precision: str

    def to_dict(self) -> Json:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, name: str = "attempt") -> Attempt:
        r = _Reader(data, name)
        return cls(
            attempt=r.integer("attempt"),
            seed=r.integer("seed"),
            signals=r.obj("signals"),
            verdict=r.get("verdict", (list,)),
            precision=r.text("precision"),
        )


@dataclass(frozen=True)
class SidecarQuality:
    """The item's quality (docs/quality.md): every attempt in order, which one was kept (its
    frames are the output), whether the kept one still breaks a rule (a dud), and the rules."""

    attempts: list[Attempt]
    kept: int  # index into attempts
    dud: bool
    rules: Json  # the quality config's rules in effect (min_*/max_* set), and max_attempts

    @property
    def kept_attempt(self) -> Attempt:
        return self.attempts[self.kept]

    def to_dict(self) -> Json:
        return {"attempts": [a.to_dict() for a in self.attempts], "kept": self.kept, "dud": self.dud, "rules": self.rules}

    @classmethod
    def from_dict(cls, data: Any, name: str = "quality") -> SidecarQuality:
        r = _Reader(data, name)
        raw = r.get("attempts", (list,))
        attempts = [Attempt.from_dict(a, f"{name}.attempts[{n}]") for n, a in enumerate(raw)]
        kept = r.integer("kept")
        if not 0 <= kept < len(attempts):
            raise SidecarError(None, f"field '{name}.kept' is {kept}, but there are {len(attempts)} attempts")
        return cls(attempts=attempts, kept=kept, dud=r.get("dud", (bool,)), rules=r.obj("rules"))


@dataclass(frozen=True)
class ReusedFrom:
    """Where an item's output was linked from instead of generated (sweep.py): another
    run dir's item with the same key, and how (store.link_output: hardlink, symlink, copy)."""

    run_dir: str
    id: str
    how: str

    def to_dict(self) -> Json:
        return {"run_dir": self.run_dir, "id": self.id, "how": self.how}

    @classmethod
    def from_dict(cls, data: Any, name: str = "reused_from") -> ReusedFrom:
        r = _Reader(data, name)
        return cls(run_dir=r.text("run_dir"), id=r.text("id"), how=r.text("how"))


@dataclass(frozen=True)
class Sidecar:
    """One finished item. Build it with the constructor (worker.py), read it with
    `Sidecar.read` / `from_json`, write `to_json()` (store.RunStore.commit)."""

    # What the item is: its id, key (everything that determines the frames: store.KeyMaker)
    # and output key (everything that shapes the written file: outputs.output_key).
    id: str
    key: str
    output_key: str | None  # None only in records of an older svdbatch
    seed: int
    row: SidecarRow
    image: SidecarImage
    preprocess: Json
    params: Json  # as actually generated: an OOM fallback may lower decode_chunk_size
    # What came out.
    output: SidecarOutput
    frames_sha256: str  # of the generated uint8 frames (outputs.frames_sha256): reproduce compares it
    timings: Timings
    finished_at: str  # ISO time, UTC
    # What made it: the pipeline and the machine, as each worker records them.
    config: Json
    model: Json
    memory: Json  # the memory preset in effect (after any OOM fallback)
    oom_fallback: list[str]  # the steps run.retry_on_oom took, in order
    device: str
    device_name: str
    num_threads: int  # intra-op threads: they change float results
    compiled: bool
    versions: dict[str, str]
    warmup_s: float | None = None  # the compiled UNet's warm-up (once per load); written when set
    reused_from: ReusedFrom | None = None  # written when the output was linked, not generated
    # Quality signals, attempts and dud verdict (docs/quality.md); absent in older records.
    quality: SidecarQuality | None = None
    status: str = DONE
    schema: int = SCHEMA

    # -- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> Json:
        out: Json = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("warmup_s", "reused_from", "quality"):
                continue  # present only when they apply
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    def to_json(self) -> bytes:
        """The bytes written to items/<id>.json."""
        return body_bytes(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Sidecar:
        if not isinstance(data, dict):
            raise SidecarError(None, f"a JSON {type(data).__name__}, not an object")
        if "schema" not in data or "output" not in data:
            raise SidecarError(None, "no schema or output field")
        r = _Reader(data, "")
        schema = r.integer("schema")
        if schema != SCHEMA:
            raise SidecarError(None, f"schema {schema}; this svdbatch reads schema {SCHEMA}")
        reused = r.get("reused_from", (dict,), required=False)
        quality = r.get("quality", (dict,), required=False)
        return cls(
            schema=schema,
            status=r.text("status"),
            id=r.text("id"),
            key=r.text("key"),
            output_key=r.text("output_key", False),
            seed=r.integer("seed"),
            row=SidecarRow.from_dict(r.obj("row")),
            image=SidecarImage.from_dict(r.obj("image")),
            preprocess=r.obj("preprocess"),
            params=r.obj("params"),
            output=SidecarOutput.from_dict(r.obj("output")),
            frames_sha256=r.text("frames_sha256"),
            timings=Timings.from_dict(r.obj("timings")),
            finished_at=r.text("finished_at"),
            config=r.obj("config"),
            model=r.obj("model"),
            memory=r.obj("memory"),
            oom_fallback=r.get("oom_fallback", (list,)),
            device=r.text("device"),
            device_name=r.text("device_name"),
            num_threads=r.integer("num_threads"),
            compiled=r.get("compiled", (bool,)),
            versions=r.obj("versions"),
            warmup_s=r.number("warmup_s", False),
            reused_from=ReusedFrom.from_dict(reused) if reused is not None else None,
            quality=SidecarQuality.from_dict(quality) if quality is not None else None,
        )

    @classmethod
    def from_json(cls, body: bytes | str, where: Any = None) -> Sidecar:
        """Parse and check a sidecar; SidecarError (naming `where` and the field) if it is
        not JSON, not an object, of another schema, or lacks or mistypes a field."""
        try:
            data = json.loads(body)
        except ValueError as exc:  # also a UnicodeDecodeError
            raise SidecarError(where, str(exc), parse=True) from None
        try:
            return cls.from_dict(data)
        except SidecarError as exc:
            raise SidecarError(where, exc.problem) from None

    @classmethod
    def read(cls, path: str | os.PathLike) -> Sidecar:
        """The sidecar at `path`. OSError if it cannot be read; SidecarError if it is not a
        sidecar of this version."""
        return cls.from_json(Path(path).read_bytes(), where=path)

    @classmethod
    def read_with_size(cls, path: str | os.PathLike) -> tuple[Sidecar, int]:
        """(sidecar, its size in bytes): the results line vouches for that size."""
        body = Path(path).read_bytes()
        return cls.from_json(body, where=path), len(body)

    # -- what the record says -----------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.status == DONE

    def done_with(self, key: str | None, output_key: str | None) -> bool:
        """Finished with exactly these keys (frames and file settings)."""
        return self.done and self.key == key and self.output_key == output_key

    @property
    def generation_seed(self) -> int:
        """The seed the kept frames were generated with: the row's seed, or a redo's."""
        return self.quality.kept_attempt.seed if self.quality is not None else self.seed

    @property
    def precision(self) -> str | None:
        """The NaN-rescue step the kept frames were generated at (models/rescue.py); None: as loaded."""
        return self.quality.kept_attempt.precision if self.quality is not None else None

    def gen_params(self) -> GenParams:
        """The generation parameters as params.GenParams."""

        return GenParams(**self.params)

    def preprocessing(self, max_image_pixels: int | None) -> Preprocess:
        """The preprocessing as images.Preprocess. run.max_image_pixels is not part of it
        (it refuses images, it never changes pixels): the caller says which limit applies."""

        return Preprocess.from_record(self.preprocess, max_image_pixels)

    def reused(
        self,
        item_id: str,
        output: SidecarOutput,
        reused_from: ReusedFrom,
        reuse_s: float,
        finished_at: str,
        row: SidecarRow,
        image: SidecarImage,
    ) -> Sidecar:
        """This (source) item's record for another item whose output is linked from it: same
        frames, params, model and config, with that item's own id, row, image and output."""
        return replace(
            self,
            id=item_id,
            row=row,
            image=image,
            output=output,
            reused_from=reused_from,
            finished_at=finished_at,
            timings=Timings(total_s=reuse_s, reuse_s=reuse_s, source=self.timings),
        )

    def result_record(self, sidecar_bytes: int) -> Json:
        """The results.jsonl line for this sidecar (`sidecar_bytes`: its size on disk)."""
        return result_record(self.to_dict(), sidecar_bytes)


def result_record(sidecar: Mapping[str, Any], sidecar_bytes: int) -> Json:
    """The results.jsonl line for a sidecar in its JSON form: what resume checks with two
    stats and status counts, without opening the sidecar. (A JSON form, not a Sidecar, so
    bench/plan.py's minimal fake sidecars make lines too.)"""
    output, image = sidecar["output"], sidecar["image"]
    # An output linked from another run dir (sweep.py) says so: throughput ignores it.
    reused = {"reused_from": sidecar["reused_from"]} if sidecar.get("reused_from") else {}
    return {
        **reused,
        **quality_fields(sidecar.get("quality")),
        "id": sidecar["id"],
        "key": sidecar["key"],
        "output_key": sidecar.get("output_key"),
        "output": output["path"],
        "output_bytes": output["bytes"],
        "output_sha256": output.get("sha256"),
        "sidecar_bytes": sidecar_bytes,
        # Lets the next plan reuse the hash while the image file is unchanged.
        "image_path": image["path"],
        "image_sha256": image["sha256"],
        "image_bytes": image.get("bytes"),
        "image_mtime_ns": image.get("mtime_ns"),
        "seed": sidecar["seed"],
        "frames_sha256": sidecar["frames_sha256"],
        "seconds": sidecar["timings"]["total_s"],
        "finished_at": sidecar["finished_at"],
        # Lets the next plan see a meta_* edit without opening the sidecar.
        "meta_sha256": meta_digest((sidecar.get("row") or {}).get("meta") or {}),
    }


def quality_fields(quality: Mapping[str, Any] | None) -> Json:
    """What a results line carries of the item's quality, so status, the gallery and the
    sweep page need not open sidecars: dud, the kept attempt's signals, the attempt count."""
    if not quality:
        return {}
    kept = quality["attempts"][quality["kept"]]
    return {"dud": quality["dud"], "signals": kept["signals"], "attempts": len(quality["attempts"])}


EMPTY_META_SHA256 = hashlib.sha256(b"{}").hexdigest()
# One encoder for every digest: json.dumps with options builds a new one per call (3x slower,
# and a resume digests every done row's meta_* values).
_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def meta_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of a row's meta_* values (canonical JSON): most rows have none, hashed once."""
    if not meta:
        return EMPTY_META_SHA256
    return hashlib.sha256(_canonical_json(meta).encode()).hexdigest()


def named_output(path: str | os.PathLike) -> str | None:
    """The output path the sidecar at `path` names, also when the rest of it is not a valid
    record: verify --repair sets aside what a damaged sidecar still points to. None if it
    names none (or cannot be read)."""
    try:
        output = json.loads(Path(path).read_bytes()).get("output")
    except (OSError, ValueError, AttributeError):
        return None
    value = output.get("path") if isinstance(output, dict) else None
    return value if isinstance(value, str) else None
