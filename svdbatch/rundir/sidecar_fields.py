"""The sidecar's sub-records (its manifest row, source image, output file, timings, quality
attempts, where a reused output came from), and the typed reader they and the Sidecar share:
every check names the field it refuses (SidecarError)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

Json = dict[str, Any]


class SidecarError(ValueError):
    """A sidecar that cannot be read as this version's record: `problem` says why (the
    field), `where` is the file; `parse` is true when the bytes are not JSON at all."""

    def __init__(self, where: Any, problem: str, parse: bool = False):
        self.where, self.problem, self.parse = where, problem, parse
        what = f"does not parse: {problem}" if parse else f"not an svdbatch item record ({problem})"
        super().__init__(f"{where}: {what}" if where else what)


# -- reading helpers: every check names the field ------------------------------------------
_MISSING = object()


class FieldReader:
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

    def sub(self, key: str) -> FieldReader:
        return FieldReader(self.obj(key), self._where(key))


# -- the sub-records ---------------------------------------------------------------------
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
        r = FieldReader(data, name)
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
        r = FieldReader(data, name)
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
        r = FieldReader(data, name)
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
        r = FieldReader(data, name)
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
        r = FieldReader(data, name)
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
        r = FieldReader(data, name)
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
        r = FieldReader(data, name)
        return cls(run_dir=r.text("run_dir"), id=r.text("id"), how=r.text("how"))
