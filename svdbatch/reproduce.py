"""`svdbatch reproduce <sidecar.json>`: regenerate one item from its sidecar alone.

The sidecar holds everything that determines the frames: the model settings, the resolved
parameters, the seed, the preprocessing, the input image (path and sha256) and the
intra-op thread count. Reproducing loads that model, checks the input is unchanged, runs the
item once and compares the sha256 of the frames with the recorded one. It also checks that the file on
disk next to the sidecar is the one recorded (sha256 of the written file): the frames
hash vouches for the generation, this for the video a user actually has.

Exit status: 0 the frames match (and the file on disk is the recorded one), 1 the frames
differ or the file on disk is missing or changed, 2 the item cannot be re-run as recorded
(unreadable sidecar, missing or changed input image, model not loadable).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from omegaconf import OmegaConf

from .config import ConfigError, FetchConfig, MemoryConfig, ModelConfig, OutputConfig, OutputFormat, ResizeMode
from .fetch import FetchError, UrlCache
from .images import DEFAULT_MAX_IMAGE_PIXELS, PREPROCESS_VERSION, Preprocess, file_sha256
from .manifest import Item
from .models import ModelLoadError, load_pipeline, model_identity, resolve_devices
from .outputs import output_bytes, output_sha256
from .params import GenParams
from .worker import Worker, frames_sha256, load_entry, software_versions
from .plan import PlannedItem
from .store import RunStore, sidecar_relpath

from .cli import EXIT_BAD_INPUT, EXIT_ITEMS_FAILED, EXIT_OK  # cli owns exit codes (and imports this module lazily)

EXIT_MATCH, EXIT_MISMATCH, EXIT_CANNOT = EXIT_OK, EXIT_ITEMS_FAILED, EXIT_BAD_INPUT


class CannotReproduce(RuntimeError):
    pass


@dataclass
class Reproduction:
    item_id: str
    recorded: str
    got: str
    notes: list[str] = field(default_factory=list)  # environment differences worth knowing
    file_ok: Optional[bool] = None  # the file on disk is the recorded one; None: not checked
    file_report: str = ""

    @property
    def matches(self) -> bool:
        return self.recorded == self.got


def check_file_on_disk(sidecar_path: Path, sidecar: dict[str, Any]) -> tuple[Optional[bool], str]:
    """(ok, what to say) about the written output next to the sidecar; ok None: not checkable."""
    output = sidecar.get("output") or {}
    recorded = output.get("sha256")
    if not recorded:
        return None, "file on disk not checked: the sidecar records no file sha256 (written by an older svdbatch)"
    sidecar_path = Path(sidecar_path).resolve()
    run_dir = sidecar_path.parents[len(PurePosixPath(sidecar["id"]).parts)]
    if run_dir / sidecar_relpath(sidecar["id"]) != sidecar_path:
        return None, "file on disk not checked: the sidecar is not inside a run dir (<run dir>/items/<id>.json)"
    path = run_dir / output["path"]
    if output_bytes(path) < 0:
        return False, f"file on disk is MISSING: {path}"
    got = output_sha256(path)
    if got != recorded:
        return False, f"file on disk DIFFERS from the sidecar: {path} has sha256 {got}, recorded {recorded}"
    return True, f"file on disk matches the sidecar (sha256 {got})"


def _structured(schema: type, recorded: dict[str, Any]):
    return OmegaConf.merge(OmegaConf.structured(schema), recorded)


def source_image(sidecar: dict[str, Any], scratch: Path) -> Path:
    """The recorded input file, or a fresh download of its URL; must hash as recorded."""
    image = sidecar["image"]
    path = Path(image["path"])
    if not path.is_file() and image.get("url"):
        fetch = _structured(FetchConfig, sidecar.get("config", {}).get("fetch", {}))
        try:
            path = UrlCache(scratch, fetch).fetch(image["url"])
        except FetchError as exc:
            raise CannotReproduce(f"the input image is gone and could not be downloaded again: {exc}") from None
    if not path.is_file():
        raise CannotReproduce(f"input image not found: {path}")
    if file_sha256(path) != image["sha256"]:
        raise CannotReproduce(f"input image changed since the run: {path} no longer has sha256 {image['sha256']}")
    return path


def reproduce(sidecar_path: Path) -> Reproduction:
    try:
        sidecar = json.loads(Path(sidecar_path).read_text())
        config = sidecar["config"]
        recorded = sidecar["frames_sha256"]
    except (OSError, ValueError, KeyError) as exc:
        raise CannotReproduce(f"{sidecar_path}: not a readable svdbatch sidecar ({exc})") from None
    if sidecar.get("status") != "done":
        raise CannotReproduce(f"{sidecar_path}: the item is not done (status {sidecar.get('status')!r})")

    notes: list[str] = []
    model = _structured(ModelConfig, config["model"])
    # After an OOM fallback the worker ran with forward chunking the config did not ask for;
    # it can change the floats, so reproduce what the sidecar says was in effect.
    in_effect = sidecar.get("memory", {})
    memory = _structured(MemoryConfig, {**config["memory"], "forward_chunking": in_effect.get("forward_chunking", config["memory"]["forward_chunking"])})
    device = resolve_devices(sidecar["device"])[0]
    identity = model_identity(model, device).as_dict()
    if identity != sidecar["model"]:
        notes.append(f"model differs from the recorded one: {sidecar['model']} -> {identity}")
    versions = software_versions()
    changed = {k: (v, versions.get(k)) for k, v in sidecar.get("versions", {}).items() if versions.get(k) != v}
    notes.extend(f"{name} {was} -> {now}" for name, (was, now) in sorted(changed.items()))

    prep = sidecar["preprocess"]
    if prep.get("version") != PREPROCESS_VERSION:
        notes.append(f"image preprocessing version {prep.get('version')} -> {PREPROCESS_VERSION}")
    limit = config.get("run", {}).get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    preprocess = Preprocess(
        resize=ResizeMode(prep["resize"]), pad_color=tuple(prep["pad_color"]), background=tuple(prep["background"]),
        max_image_pixels=limit,
    )
    row = sidecar["row"]

    with tempfile.TemporaryDirectory(prefix="svdbatch-reproduce-") as scratch:
        path = source_image(sidecar, Path(scratch))
        item = Item(
            id=sidecar["id"], image=path, image_ref=row["image"], seed=int(sidecar["seed"]),
            seed_derived=row.get("seed_derived", False), overrides=row.get("overrides", {}),
            meta=row.get("meta", {}), manifest=row.get("manifest", ""), line=row.get("line", 0),
        )
        planned = PlannedItem(item=item, params=GenParams(**sidecar["params"]), image_sha256=sidecar["image"]["sha256"],
                              image_bytes=0, image_mtime_ns=0, key=sidecar["key"], preprocess=preprocess, source=str(path))
        ready = load_entry(planned)
        if ready.error is not None:
            raise CannotReproduce(f"cannot load the source image: {ready.error}")
        # The recorded thread count: float results depend on it. Nothing is written: the
        # worker's store is a scratch folder.
        worker = Worker(load_pipeline(model, memory, device), RunStore(Path(scratch), OutputFormat.frames),
                        OutputConfig(), {}, num_threads=sidecar["num_threads"])
        (frames,) = worker.generate([ready.image], planned.params, [planned.item.seed])
    file_ok, file_report = check_file_on_disk(sidecar_path, sidecar)
    return Reproduction(item_id=sidecar["id"], recorded=recorded, got=frames_sha256(frames), notes=notes,
                        file_ok=file_ok, file_report=file_report)


def reproduce_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="svdbatch reproduce", description="regenerate one item from its sidecar alone and compare the frames hash",
        epilog="exit status: 0 the frames match, 1 they differ, 2 the item cannot be re-run as recorded",
    )
    parser.add_argument("sidecar", type=Path, help="<run dir>/items/<id>.json")
    options = parser.parse_args(args)  # a bad command line exits 2, like EXIT_CANNOT
    try:
        result = reproduce(options.sidecar)
    except (CannotReproduce, ConfigError, ModelLoadError) as exc:
        print(f"svdbatch reproduce: cannot reproduce: {exc}", file=sys.stderr)
        return EXIT_CANNOT
    for note in result.notes:
        print(f"  note: {note}", file=sys.stderr)
    if result.matches:
        print(f"{result.item_id}: frames match the sidecar (sha256 {result.got})")
    else:
        print(f"{result.item_id}: frames DIFFER: recorded sha256 {result.recorded}, got {result.got}")
    print(f"{result.item_id}: {result.file_report}")
    return EXIT_MATCH if result.matches and result.file_ok is not False else EXIT_MISMATCH
