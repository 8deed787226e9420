"""The item sidecar (``<run dir>/items/<id>.json``) as one typed record.

A sidecar says everything about one finished item: its manifest row, source image,
preprocessing, generation parameters and seed, the model and software that made it, the
written file and the timings. Its rename into place is what makes an item done
(store.py owns where it lives and the write); this module owns what is in it: the fields,
their JSON form (``to_json``, the exact bytes written, so the results line's
``sidecar_bytes`` and verify's checks hold) and reading one back (``Sidecar.read``), which
refuses a truncated, foreign or older record with a ``SidecarError`` naming the file and
the field. Its own sub-records (row, image, output, ...) are in sidecar_fields.py.

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
from svdbatch.rundir.sidecar_fields import (
    FieldReader,
    Json,
    ReusedFrom,
    SidecarError,
    SidecarImage,
    SidecarOutput,
    SidecarQuality,
    SidecarRow,
    Timings,
)

SCHEMA = 1  # bump when a field changes meaning; a reader refuses other schemas
DONE = "done"  # the only status written today: the item is finished


def body_bytes(record: Mapping[str, Any]) -> bytes:
    """A sidecar's bytes on disk: indented, keys sorted, one trailing newline. Never NaN or
    Infinity (not JSON: other readers refuse the file); manifest validation refuses
    non-finite meta values, so this raising is a bug, not input."""
    return json.dumps(record, allow_nan=False, indent=2, sort_keys=True, default=str).encode() + b"\n"


@dataclass(frozen=True)
class Sidecar:
    """One finished item. Build it with the constructor (engine/commit.py), read it with
    `Sidecar.read` / `from_json`, write `to_json()` (store.RunStore.commit)."""

    # What the item is: its id, key (everything that determines the frames: keys.KeyMaker)
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
        r = FieldReader(data, "")
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
