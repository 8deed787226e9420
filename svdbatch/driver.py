"""The driver: config + manifest -> plan -> worker -> store.

    validate manifest and config   (nothing loads until the input is known to be good)
    prepare the run dir            (writable? clean up after a killed run)
    plan                           (resolve params and keys; split done from to-do)
    load the pipeline once         (only if there is something to do)
    for each item: generate -> write video -> write sidecar -> append results line
                   (a failure is recorded and the batch goes on)
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .config import plain
from .manifest import Manifest, read_manifest
from .models import load_pipeline, model_identity, resolve_device
from .outputs import output_bytes, write_video
from .params import check_conditioning
from .runner import Worker
from .schedule import PlannedItem, plan_items, split_done
from .store import RunStore

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


@dataclass
class RunSummary:
    run_dir: Path
    done: int = 0
    skipped: int = 0
    failed: int = 0
    invalid: int = 0  # manifest rows rejected by validation (non-strict runs)
    seconds: float = 0.0
    generate_seconds: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.invalid == 0

    def line(self) -> str:
        per_item = f"{sum(self.generate_seconds) / len(self.generate_seconds):.2f} s/item" if self.generate_seconds else "-"
        invalid = f", {self.invalid} invalid rows" if self.invalid else ""
        return (
            f"svdbatch: {self.done} done, {self.skipped} skipped, {self.failed} failed{invalid} "
            f"in {self.seconds:.1f} s ({per_item}) -> {self.run_dir}"
        )


def load_manifest(cfg: DictConfig) -> Manifest:
    problems = check_conditioning(cfg.conditioning)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return read_manifest(cfg.manifest, run_seed=cfg.run.seed, strict=cfg.run.strict, check_images=cfg.run.check_images)


def run(cfg: DictConfig) -> RunSummary:
    started = time.perf_counter()
    manifest = load_manifest(cfg)
    store = RunStore(Path(cfg.run.dir), cfg.output.format)
    store.prepare()
    store.write_config(OmegaConf.to_yaml(cfg, resolve=True))
    summary = RunSummary(run_dir=store.root)

    for line, item_id, problems in manifest.bad_rows:
        store.record_failure(item_id, None, "invalid manifest row", {"problems": [str(p) for p in problems], "line": line})
        summary.invalid += 1

    device = resolve_device(cfg.run.device)
    identity = model_identity(cfg.model, device)
    planned = plan_items(manifest.items, cfg.conditioning, cfg.model, cfg.memory, identity.as_dict(), cfg.run.limit)
    plan = split_done(planned, store)
    summary.skipped = len(plan.done)
    if plan.done:
        log.info("resuming: %d of %d items already done", len(plan.done), len(planned))

    if plan.todo:
        worker = Worker(load_pipeline(cfg.model, cfg.memory, device), cfg.run.num_threads, cfg.run.step_progress)
        context = {
            "config": plain(cfg),
            "model": identity.as_dict(),
            **worker.environment(),
        }
        bar = tqdm(plan.todo, desc=store.root.name, unit="item", disable=not cfg.run.progress, dynamic_ncols=True)
        for entry in bar:
            generate_seconds = process_item(worker, store, entry, cfg, context)
            if generate_seconds is None:
                summary.failed += 1
            else:
                summary.done += 1
                summary.generate_seconds.append(generate_seconds)
            bar.set_postfix(done=summary.done, failed=summary.failed, refresh=False)
        bar.close()

    summary.seconds = time.perf_counter() - started
    return summary


def process_item(
    worker: Worker, store: RunStore, entry: PlannedItem, cfg: DictConfig, context: dict[str, Any]
) -> Optional[float]:
    """Generate, write and commit one item. Returns its generation seconds, or None after
    recording the failure."""
    item = entry.item
    try:
        generated = worker.run(entry)
        write_start = time.perf_counter()
        fps = cfg.output.fps or entry.params.fps
        video = store.video_path(item.id)
        write_video(generated.frames, video, cfg.output, fps)
        timings = {**generated.timings, "write_s": time.perf_counter() - write_start}
        timings["total_s"] = sum(timings.values())
        sidecar = {
            "schema": 1,
            "status": "done",
            "id": item.id,
            "key": entry.key,
            "seed": item.seed,
            "row": item.row_record(),
            "image": {"path": str(item.image), "sha256": entry.image_sha256, "size": list(generated.source_size)},
            "params": entry.params.as_dict(),
            "output": {
                "path": store.relative(video),
                "format": plain(cfg.output)["format"],
                "fps": fps,
                "bytes": output_bytes(video),
                "frames": int(generated.frames.shape[0]),
                "height": int(generated.frames.shape[1]),
                "width": int(generated.frames.shape[2]),
            },
            "frames_sha256": generated.frames_sha256,
            "timings": timings,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **context,
        }
        store.commit(sidecar)
        return generated.timings["generate_s"]
    except Exception as exc:  # one bad item must never stop the batch
        log.error("item %s failed: %s: %s", item.id, type(exc).__name__, exc)
        store.record_failure(
            item.id,
            entry.key,
            f"{type(exc).__name__}: {exc}",
            {"line": item.line, "traceback": traceback.format_exc()},
        )
        return None
