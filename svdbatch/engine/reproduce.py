"""`svdbatch reproduce <sidecar.json>`: regenerate one item from its sidecar alone.

The sidecar holds everything that determines the frames: the model settings, the resolved
parameters, the seed, the preprocessing, the input image (path and sha256) and the
intra-op thread count. Reproducing loads that model, checks the input is unchanged, runs the
item once and compares the sha256 of the frames with the recorded one. It also checks that the file on
disk next to the sidecar is the one recorded (sha256 of the written file): the frames
hash vouches for the generation, this for the video a user actually has.

A dud's redo or a rescued item is regenerated as its kept attempt was: that attempt's seed
and precision step (docs/quality.md).

Exit status: 0 the frames match (and the file on disk is the recorded one), 1 the frames
differ or the file on disk is missing or changed, 2 the item cannot be re-run as recorded
(unreadable sidecar, missing or changed input image, model not loadable).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from svdbatch.core.config import FetchConfig, MemoryConfig, ModelConfig, typed
from svdbatch.core.errors import CannotReproduce
from svdbatch.core.params import DEFAULT_MAX_IMAGE_PIXELS, PREPROCESS_VERSION
from svdbatch.engine.generation import generate_frames
from svdbatch.engine.worker import software_versions
from svdbatch.inputs.fetch import FetchError, UrlCache
from svdbatch.inputs.images import file_sha256, pipeline_input
from svdbatch.models.devices import pin_threads, resolve_devices
from svdbatch.models.identity import model_identity
from svdbatch.models.loading import load_pipeline
from svdbatch.models.rescue import precision
from svdbatch.rundir.layout import FLAT, GROUPED, sidecar_relpath
from svdbatch.rundir.outputs import frames_sha256, output_bytes, output_sha256
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.sidecar_fields import SidecarError


@dataclass
class Reproduction:
    item_id: str
    recorded: str
    got: str
    notes: list[str] = field(default_factory=list)  # environment differences worth knowing
    file_ok: bool | None = None  # the file on disk is the recorded one; None: not checked
    file_report: str = ""

    @property
    def matches(self) -> bool:
        return self.recorded == self.got


def check_file_on_disk(sidecar_path: Path, sidecar: Sidecar) -> tuple[bool | None, str]:
    """(ok, what to say) about the written output next to the sidecar; ok None: not checkable."""
    recorded = sidecar.output.sha256
    if not recorded:
        return None, "file on disk not checked: the sidecar records no file sha256 (written by an older svdbatch)"
    sidecar_path = Path(sidecar_path).resolve()
    depth = len(PurePosixPath(sidecar.id).parts)
    # items/<bucket>/<id>.json (layout 2) or items/<id>.json (run dirs of older versions)
    parents = sidecar_path.parents
    found = [
        parents[up]
        for layout, up in ((GROUPED, depth + 1), (FLAT, depth))
        if up < len(parents) and parents[up] / sidecar_relpath(sidecar.id, layout) == sidecar_path
    ]
    if not found:
        return None, "file on disk not checked: the sidecar is not inside a run dir (<run dir>/items/<bucket>/<id>.json)"
    run_dir = found[0]
    path = run_dir / sidecar.output.path
    if output_bytes(path) < 0:
        return False, f"file on disk is MISSING: {path}"
    got = output_sha256(path)
    if got != recorded:
        return False, f"file on disk DIFFERS from the sidecar: {path} has sha256 {got}, recorded {recorded}"
    return True, f"file on disk matches the sidecar (sha256 {got})"


def source_image(sidecar: Sidecar, scratch: Path) -> Path:
    """The recorded input file, or a fresh download of its URL; must hash as recorded."""
    image = sidecar.image
    path = Path(image.path)
    if not path.is_file() and image.url:
        fetch = typed(FetchConfig, sidecar.config.get("fetch", {}))
        try:
            path = UrlCache(scratch, fetch).fetch(image.url)
        except FetchError as exc:
            raise CannotReproduce(f"the input image is gone and could not be downloaded again: {exc}") from None
    if not path.is_file():
        raise CannotReproduce(f"input image not found: {path}")
    if file_sha256(path) != image.sha256:
        raise CannotReproduce(f"input image changed since the run: {path} no longer has sha256 {image.sha256}")
    return path


def environment_notes(sidecar: Sidecar, identity: dict[str, Any]) -> list[str]:
    """What differs from the recorded model, software and preprocessing: worth knowing when
    the frames differ."""
    notes = []
    if identity != sidecar.model:
        notes.append(f"model differs from the recorded one: {sidecar.model} -> {identity}")
    versions = software_versions()
    changed = {k: (v, versions.get(k)) for k, v in sidecar.versions.items() if versions.get(k) != v}
    notes.extend(f"{name} {was} -> {now}" for name, (was, now) in sorted(changed.items()))
    if sidecar.preprocess.get("version") != PREPROCESS_VERSION:
        notes.append(f"image preprocessing version {sidecar.preprocess.get('version')} -> {PREPROCESS_VERSION}")
    return notes


def reproduce(sidecar_path: Path) -> Reproduction:
    """Read the sidecar, check its input, load its pipeline, generate, compare."""
    try:
        sidecar = Sidecar.read(sidecar_path)
        config = sidecar.config
        model = typed(ModelConfig, config["model"])
        # After an OOM fallback the worker ran with forward chunking the config did not ask
        # for; it can change the floats, so reproduce what the sidecar says was in effect.
        forward_chunking = sidecar.memory.get("forward_chunking", config["memory"]["forward_chunking"])
        memory = typed(MemoryConfig, {**config["memory"], "forward_chunking": forward_chunking})
        preprocess = sidecar.preprocessing(config.get("run", {}).get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        params = sidecar.gen_params()
    except (OSError, SidecarError, KeyError, TypeError, ValueError) as exc:
        raise CannotReproduce(f"{sidecar_path}: not a readable svdbatch sidecar ({exc})") from None
    if not sidecar.done:
        raise CannotReproduce(f"{sidecar_path}: the item is not done (status {sidecar.status!r})")

    device = resolve_devices(sidecar.device)[0]
    notes = environment_notes(sidecar, model_identity(model, device).as_dict())
    with tempfile.TemporaryDirectory(prefix="svdbatch-reproduce-") as scratch:
        path = source_image(sidecar, Path(scratch))
        try:
            image, _ = pipeline_input(path, preprocess, params.width, params.height)
        except Exception as exc:
            raise CannotReproduce(f"cannot load the source image: {exc}") from None
        loaded = load_pipeline(model, memory, device)
        loaded.pipe.set_progress_bar_config(disable=True)  # one item: no bar of denoising steps
        pin_threads(sidecar.num_threads)  # the recorded thread count: float results depend on it
        # The kept attempt: a dud's redo has its own seed, a rescued item its precision step.
        with precision(loaded.pipe, sidecar.precision):
            (frames,) = generate_frames(loaded.pipe, [image], params, [sidecar.generation_seed])
    file_ok, file_report = check_file_on_disk(sidecar_path, sidecar)
    return Reproduction(
        item_id=sidecar.id,
        recorded=sidecar.frames_sha256,
        got=frames_sha256(frames),
        notes=notes,
        file_ok=file_ok,
        file_report=file_report,
    )
