"""A worker owns one loaded pipeline and turns batches of planned items into finished items.

Each item gets its own generator from its own seed, exactly as a user would call diffusers
by hand, so its frames do not depend on which worker runs it, or when. The worker keeps the
device busy: the next batch's images load on one thread and the previous batch's videos
encode and commit on another, while the main thread generates.
"""

from __future__ import annotations

import logging
import platform
import shutil
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from svdbatch.core.atomic import temp_prefix
from svdbatch.core.config import OutputConfig, plain
from svdbatch.core.outcomes import BUSY, DONE, DONE_ELSEWHERE, FAILED, INTERRUPTED, STOPPED, Outcome
from svdbatch.core.params import GenParams
from svdbatch.core.quality import QualityConfig, redoes
from svdbatch.engine.generation import FrameGenerator, Generated, Loaded, load_blank
from svdbatch.engine.plan import PlannedItem
from svdbatch.inputs.fetch import FetchError
from svdbatch.inputs.images import pipeline_input
from svdbatch.models.devices import pin_threads
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

# Batches whose videos may still be encoding while the next one generates.
MAX_PENDING_WRITES = 2


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("svdbatch", "torch", "diffusers", "transformers", "accelerate", "numpy", "pillow", "imageio-ffmpeg"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def load_entry(entry: PlannedItem) -> Loaded:
    start = time.perf_counter()
    try:
        if entry.fetch_error:
            raise FetchError(entry.fetch_error)
        assert entry.source is not None  # planned with a local file unless its fetch failed
        image, size = pipeline_input(entry.source, entry.preprocess, entry.params.width, entry.params.height)
        return Loaded(entry, image, size, time.perf_counter() - start)
    except Exception as exc:  # recorded per item by the worker
        return Loaded(entry, error=exc, error_trace=traceback.format_exc())


class Worker(FrameGenerator):
    """Turns batches of planned items into finished items in the run dir: claims each item,
    loads its image, generates (FrameGenerator), writes and commits, recording what fails."""

    def __init__(
        self,
        loaded: LoadedPipeline,
        store: RunStore,
        output: OutputConfig,
        context: dict[str, Any],
        num_threads: int | None = None,
        step_progress: bool = False,
        retry_on_oom: bool = False,
        quality: QualityConfig | None = None,
    ):
        pin_threads(num_threads)
        super().__init__(loaded, retry_on_oom, quality)
        self.store = store
        self.output = output
        self.output_format = plain(output)["format"]
        self.loaded.pipe.set_progress_bar_config(disable=not step_progress, leave=False)
        # The sidecar fields every item of this worker shares (context: the run's config).
        self.context = {**context, "model": loaded.identity.as_dict(), **self.environment()}
        # A pipeline kept between sweep points was warmed up already: once per load, not per point.
        self.warmup_s: float | None = loaded.warmup_s
        if self.warmup_s is not None:
            self.context["warmup_s"] = self.warmup_s
        # run.keep_replaced: the folder an older output of a redone item is moved to (WorkerSpec).
        self.keep_replaced_in: str | None = None
        # Set (by the writer thread) when the disk is full or read-only: no more work.
        self.stop_reason: str | None = None

    def environment(self) -> dict[str, Any]:
        device = self.loaded.device
        return {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
            "num_threads": torch.get_num_threads(),
            "compiled": self.loaded.compiled,
            "versions": software_versions(),
        }

    def warm_up(self, params: GenParams) -> None:
        """A compiled UNet compiles on its first call; do that once, outside item timings."""
        if not self.loaded.compiled or self.warmup_s is not None:
            return
        start = time.perf_counter()
        self.generate([load_blank(params.width, params.height)], params, [0])
        self.warmup_s = self.loaded.warmup_s = time.perf_counter() - start
        self.context["warmup_s"] = self.warmup_s
        log.info("compiled UNet warmed up in %.1f s", self.warmup_s)

    # -- the item unit ----------------------------------------------------------------
    def write_and_commit(self, generated: Generated) -> Outcome:
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

    def generate_batch(self, batch: list[Loaded]) -> tuple[list[Outcome], list[Generated]]:
        """Generate a batch; returns outcomes settled without generating, and what to write."""
        settled = [r.settled for r in batch if r.settled is not None]
        failed = [self.fail_loaded(r, r.error, r.error_trace) for r in batch if r.settled is None and r.error is not None]
        ready = [r for r in batch if r.settled is None and r.error is None]
        if not ready:
            return settled + failed, []
        params = ready[0].entry.params
        try:
            self.warm_up(params)
            start = time.perf_counter()
            videos, used, fallback, step = self.generate_rescued(
                [r.image for r in ready], params, [r.entry.item.seed for r in ready]
            )
            per_item = (time.perf_counter() - start) / len(ready)
        except Exception as exc:
            trace = traceback.format_exc()
            return settled + failed + [self.fail_loaded(r, exc, trace) for r in ready], []
        generated = []
        for r, frames in zip(ready, videos, strict=False):
            made = Generated(r, frames, per_item, used, fallback, precision=step)
            if not redoes(self.quality):
                generated.append(made)  # measured and judged on the writer thread, while the next batch generates
                continue
            try:
                generated.append(self.judge(made))
            except Exception as exc:  # a redo that failed fails its item, not the batch
                failed.append(self.fail_loaded(r, exc, traceback.format_exc()))
        return settled + failed, generated

    def fail_loaded(self, ready: Loaded, exc: BaseException, trace: str) -> Outcome:
        try:
            return self.fail(ready.entry, exc, trace)
        finally:
            self.store.release(ready.claim)

    def claim_and_load(self, entry: PlannedItem) -> Loaded:
        """Claim the item for this process, then load its image (on the loader thread).
        Several processes may share a run dir (two runs started by hand, shards, workers):
        the claim makes sure exactly one of them generates each item."""
        if self.stop_reason:
            return Loaded(entry, settled=Outcome(entry.item.id, STOPPED, error=self.stop_reason))
        try:
            claim = self.store.claim(entry.item.id)
        except OSError as exc:  # claims/ is in the run dir: gone or read-only stops the run
            why = self.store.write_stop(exc)
            if why is None:
                return Loaded(entry, error=exc, error_trace=traceback.format_exc())
            return Loaded(entry, settled=self.stop(entry, why))
        if claim is None:
            return Loaded(entry, settled=Outcome(entry.item.id, BUSY))
        if self.store.done_record(entry.item.id, entry.key, entry.output_key) is not None:
            self.store.release(claim)  # finished by another process since this run's plan
            return Loaded(entry, settled=Outcome(entry.item.id, DONE_ELSEWHERE))
        loaded = load_entry(entry)
        loaded.claim = claim
        return loaded

    def run(
        self,
        batches: Iterable[tuple[int, list[PlannedItem]]],
        report: Report,
        stop: Callable[[], bool] = lambda: False,
        abandon: Callable[[], bool] | None = None,
    ) -> None:
        """Process (batch id, items) pairs; `report(batch id, outcomes)` is called (from the
        writer thread) as soon as a batch is committed, even while the worker waits for more.
        After a stop (disk full) every remaining batch is reported as stopped, untouched.
        Once `stop()` is true (a signal) no new batch is taken or started; the one generating
        finishes unless `abandon()` turns true, which raises stops.Interrupted."""
        batches = iter(batches)
        self.abandon = abandon

        def fetch_and_load() -> tuple[int, list[Loaded]] | None:
            # Runs on the loader thread: waiting for the next batch never stalls generation.
            if stop():
                return None
            nxt = next(batches, None)
            if nxt is None:
                return None
            batch_id, entries = nxt
            return batch_id, [self.claim_and_load(entry) for entry in entries]

        with (
            ThreadPoolExecutor(1, thread_name_prefix="svdbatch-load") as loader,
            ThreadPoolExecutor(1, thread_name_prefix="svdbatch-write") as writer,
        ):
            in_flight: deque[list[Future]] = deque()
            upcoming = loader.submit(fetch_and_load)
            while (current := upcoming.result()) is not None:
                upcoming = loader.submit(fetch_and_load)
                batch_id, loaded = current
                if self.stop_reason:
                    self.settle_stopped(batch_id, loaded, report)
                    continue
                if stop():  # loaded before the signal: not started, so left for the next run
                    self.settle_stopped(batch_id, loaded, report, INTERRUPTED, "interrupted")
                    continue
                settled, to_write = self.generate_batch(loaded)
                writes = [writer.submit(self.write_and_commit, job) for job in to_write]
                report_when_written(batch_id, settled, writes, report)
                in_flight.append(writes)
                while len(in_flight) > MAX_PENDING_WRITES:  # bound memory held by unwritten frames
                    wait(in_flight.popleft())

    def settle_stopped(
        self, batch_id: int, loaded: list[Loaded], report: Report, status: str = STOPPED, error: str | None = None
    ) -> None:
        for ready in loaded:
            self.store.release(ready.claim)
        error = error or self.stop_reason
        report(batch_id, [r.settled or Outcome(r.entry.item.id, status, error=error) for r in loaded])


Report = Callable[[int, list[Outcome]], None]


def report_when_written(batch_id: int, failed: list[Outcome], writes: list[Future], report: Report) -> None:
    if not writes:
        report(batch_id, failed)
        return
    remaining = [len(writes)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:  # write_and_commit never raises: failures come back as Outcomes
            report(batch_id, failed + [future.result() for future in writes])

    for future in writes:
        future.add_done_callback(one_done)
