"""Putting generated items into the run dir, one at a time, on the worker's writer thread.

The file is written under a temporary name and checked (it decodes to the frames) before
anything of the item's finished output is touched; only then is a redo's old output set
aside, the new one put in place and the sidecar committed (store.commit), and the old
output is put back if the commit fails. A failure is recorded for its item and the batch
goes on; a full, read-only or vanished run dir stops the run instead of failing every item.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from svdbatch.core.atomic import temp_prefix
from svdbatch.core.config import OutputConfig, OutputFormat
from svdbatch.core.outcomes import DONE, FAILED, STOPPED, Outcome
from svdbatch.engine.generation import Generated, Loaded
from svdbatch.engine.plan import PlannedItem
from svdbatch.models.loading import LoadedPipeline
from svdbatch.rundir import replacing
from svdbatch.rundir.outputs import (
    Written,
    frames_sha256,
    output_key,
    output_settings,
    place_output,
    remove_output,
    write_video,
    written_fps,
)
from svdbatch.rundir.sidecar import Sidecar
from svdbatch.rundir.sidecar_fields import SidecarImage, SidecarOutput, SidecarRow, Timings
from svdbatch.rundir.store import WRITE_STOP_HINT, RunStore

log = logging.getLogger(__name__)


class Committer:
    """Writes and commits the items one worker generates, and records the ones that fail.

    `context` holds the sidecar fields every item of the worker shares (the run's config,
    model, device, versions); `judge` measures and judges an item not judged yet (quality
    rules without redoes are applied here, off the generating thread)."""

    def __init__(
        self,
        store: RunStore,
        output: OutputConfig,
        loaded: LoadedPipeline,
        context: dict[str, Any],
        judge: Callable[[Generated], Generated],
        retry_on_oom: bool = False,
        keep_replaced_in: str | None = None,
    ):
        self.store = store
        self.output = output
        self.output_format = OutputFormat(output.format).value
        self.loaded = loaded
        self.context = context
        self.judge = judge
        self.retry_on_oom = retry_on_oom
        # run.keep_replaced: the folder an older output of a redone item is moved to (WorkerSpec).
        self.keep_replaced_in = keep_replaced_in
        # Set when the disk is full or read-only: no more work.
        self.stop_reason: str | None = None

    def write_and_commit(self, generated: Generated) -> Outcome:
        """Write, check and commit one generated item (on the writer thread); never raises:
        what fails is recorded as the item's failure, a full or lost disk stops the run."""
        try:
            return self._write_and_commit(generated)
        except OSError as exc:
            why = self.store.write_stop(exc)
            if why is None:
                return self.fail(generated.ready.entry, exc, traceback.format_exc())
            return self.stop(generated.ready.entry, why)
        except Exception as exc:
            return self.fail(generated.ready.entry, exc, traceback.format_exc())
        finally:
            self.store.release(generated.ready.claim)

    def _write_and_commit(self, generated: Generated) -> Outcome:
        if generated.quality is None:  # no redoes: measured and judged here, off the main thread, before encoding
            generated = self.judge(generated)
        ready, frames, generate_s = generated.ready, generated.frames, generated.generate_s
        entry, item = ready.entry, ready.entry.item
        assert entry.key is not None  # only an item whose image could be read has a key and gets generated
        start = time.perf_counter()
        fps = written_fps(self.output, entry.params.fps)
        settings = output_settings(self.output, fps)
        video = self.store.video_path(item.id)
        # Written and checked under a temporary name first (raises unless the encoder
        # succeeded and the file decodes to these frames): a redo that fails here has
        # touched nothing of the item's finished output.
        staged = video.with_name(f"{temp_prefix(video.name)}staged{video.suffix}")
        # The old output of a redo is set aside (run.keep_replaced: for good; else into a
        # temporary folder, deleted once the new sidecar is in place) only now, with the new
        # file ready, and put back if the redo fails before its sidecar is in place.
        keep = Path(self.keep_replaced_in) if self.keep_replaced_in else None
        aside = keep or self.store.root / f"{temp_prefix('replacing')}{item.id}"
        try:
            written = write_video(frames, staged, self.output, fps)
            moved = replacing.set_aside(self.store, item.id, entry.key, entry.output_key, aside)  # under the item's claim
            try:
                place_output(staged, video)
                timings = Timings.generated(ready.load_s, generate_s, time.perf_counter() - start)
                self._commit(generated, video, fps, settings, written, timings)
            except BaseException:
                committed = self.store.read_sidecar(item.id)
                if moved and not (committed and committed.done_with(entry.key, output_key(settings))):
                    replacing.restore(moved)  # the item stays done with its old output
                raise
        finally:
            remove_output(staged)
            if keep is None:
                shutil.rmtree(aside, ignore_errors=True)
        return Outcome(item.id, DONE, generate_s)

    def _commit(
        self, generated: Generated, video: Path, fps: int, settings: dict[str, Any], written: Written, timings: Timings
    ) -> None:
        """The sidecar of a generated item whose video is in place (store.commit)."""
        ready, frames = generated.ready, generated.frames
        entry, item = ready.entry, ready.entry.item
        assert entry.key is not None  # only an item whose image could be read has a key and gets generated
        self.store.commit(
            Sidecar(
                id=item.id,
                key=entry.key,
                output_key=output_key(settings),
                seed=item.seed,
                row=SidecarRow(**item.row_record()),
                image=SidecarImage(**entry.image_record(), size=ready.source_size),
                preprocess=entry.preprocess.as_dict(),
                params=generated.params.as_dict(),
                memory=self.loaded.memory_record(),
                oom_fallback=generated.oom_fallback,
                quality=generated.quality,
                output=SidecarOutput(
                    path=self.store.relative(video),
                    format=self.output_format,
                    fps=fps,
                    settings=settings,
                    bytes=written.bytes,
                    sha256=written.sha256,
                    encoder=written.encoder,
                    frames=int(frames.shape[0]),
                    height=int(frames.shape[1]),
                    width=int(frames.shape[2]),
                ),
                frames_sha256=frames_sha256(frames),
                timings=timings,
                finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **self.context,
            )
        )

    def fail(self, entry: PlannedItem, exc: BaseException, trace: str) -> Outcome:
        """Record one item's failure; the batch goes on."""
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, torch.OutOfMemoryError) and not self.retry_on_oom:
            error += " (run.retry_on_oom=true retries with a lower memory preset)"
        log.error("item %s failed: %s", entry.item.id, error)
        try:
            self.store.record_failure(entry.item.id, entry.key, error, {"line": entry.item.line, "traceback": trace})
        except OSError as record_error:  # the disk filled up (or the run dir is gone): that stops the run
            why = self.store.write_stop(record_error)
            if why is None:
                raise
            return self.stop(entry, why)
        return Outcome(entry.item.id, FAILED, error=error)

    def stop(self, entry: PlannedItem, why: str) -> Outcome:
        """Nothing can be written: stop cleanly (done items are intact) instead of failing
        every item that follows. Not recorded per item: failures.jsonl lives on the same
        full (or lost) disk, and the item is not at fault."""
        self.stop_reason = self.stop_reason or why
        log.error("stopping: %s (finished items are intact; %s)", self.stop_reason, WRITE_STOP_HINT)
        return Outcome(entry.item.id, STOPPED, error=self.stop_reason)

    def fail_loaded(self, ready: Loaded, exc: BaseException, trace: str) -> Outcome:
        try:
            return self.fail(ready.entry, exc, trace)
        finally:
            self.store.release(ready.claim)
