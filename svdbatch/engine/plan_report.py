"""What a run says about its plan before it generates: its shard, what is done already,
which finished items it redoes and why (grouped by what changed), and the rows whose own
values shadow a swept knob.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from svdbatch.engine.plan import Plan, Replacement
from svdbatch.engine.shards import Shard
from svdbatch.engine.spec import WorkerSpec
from svdbatch.inputs.items import Item, Manifest
from svdbatch.reports import sweep_root as sweep_root_of

log = logging.getLogger(__name__)


def log_plan(plan: Plan, shard: Shard, manifest: Manifest, spec: WorkerSpec) -> None:
    """What this run will do: its shard, what is done already, what it replaces."""
    if shard.count > 1:
        log.info(
            "shard %d of %d: %d items (%d rows left to the other shards)",
            shard.index,
            shard.count,
            len(manifest.items),
            manifest.other_rows,
        )
    if plan.done_count:
        log.info("resuming: %d of %d items already done", plan.done_count, plan.done_count + len(plan.todo))
    if plan.replaced:
        keep_in = spec.keep_replaced_in
        log.warning("%s", replace_report(plan.replaced, Path(keep_in) if keep_in else None))


def replace_report(replaced: list[Replacement], keep_in: Path | None) -> str:
    """Said before generating: which finished items this run redoes, why, and where the old
    outputs go (the worker moves each aside only once its new frames are generated)."""
    noun = "item" if len(replaced) == 1 else "items"
    where = (
        f"as each is redone, its old video and sidecar are moved to {keep_in}/ (run.keep_replaced=false overwrites them)"
        if keep_in
        else "their old videos are overwritten (run.keep_replaced=true keeps them)"
    )
    head = (
        f"{len(replaced)} finished {noun} will be redone because settings changed since they were made; {where}. "
        "To keep both versions side by side, run with a new run.name instead."
    )
    return "\n  ".join([head, *describe_replacements(replaced)])


def describe_replacements(replaced: list[Replacement], examples: int = 3) -> list[str]:
    """One line per set of changed fields, most items first, e.g.
    '3 items redone: resize crop -> pad, pad_color #000000 -> #202020 (rocket, sunset, waves)'.
    A field whose old and new values vary across the group is shown with one example."""
    groups: dict[tuple[str, ...], list[Replacement]] = {}
    for replacement in replaced:
        groups.setdefault(tuple(name for name, _, _ in replacement.changes), []).append(replacement)
    lines = []
    for names, members in sorted(groups.items(), key=lambda group: -len(group[1])):
        parts = []
        for position, name in enumerate(names):
            pairs = {(repr(m.changes[position][1]), repr(m.changes[position][2])) for m in members}
            old, new = members[0].changes[position][1:]
            change = f"{name} {_shown(name, old)} -> {_shown(name, new)}"
            parts.append(change if len(pairs) == 1 else f"{name} differs (e.g. {change.removeprefix(name + ' ')})")
        ids = [m.entry.item.id for m in members]
        shown = ", ".join(ids[:examples]) + (f", ... {len(ids) - examples} more" if len(ids) > examples else "")
        lines.append(f"{len(members)} item{'s' if len(members) != 1 else ''} redone: {', '.join(parts)} ({shown})")
    return lines


def _shown(name: str, value: Any) -> str:
    if name in ("pad_color", "background") and isinstance(value, list) and len(value) == 3:
        return "#{:02x}{:02x}{:02x}".format(*value)
    if name == "image":
        return f"sha256 {value}…"
    return "null" if value is None else str(value)


def warn_shadowed(items: list[Item], sweep_root: Path) -> None:
    """Once per sweep (its first job): rows whose own values override a swept knob."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.get().job.num != 0:
        return
    warning = shadowed_knobs_warning(items, sweep_root_of.swept_knobs(sweep_root_of.read_sweep_spec(sweep_root)))
    if warning:
        log.warning("%s", warning)


def shadowed_knobs_warning(items: list[Item], swept: Mapping[str, str]) -> str | None:
    """One warning naming the rows whose own values override a swept conditioning knob
    (`swept`: knob -> the sweep's key for it): at every point they get the same value, so
    the sweep does not vary them (their outputs are reused across points, not redone)."""
    shadowed: dict[str, list[str]] = {}
    for item in items:
        for knob, key in swept.items():
            if knob in item.overrides:
                shadowed.setdefault(key, []).append(item.id)
    if not shadowed:
        return None

    def names(ids: list[str]) -> str:
        return ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")

    return "; ".join(f"{names(ids)}: manifest values override the swept {key}" for key, ids in shadowed.items())
