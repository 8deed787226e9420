"""Plan a run: resolve every item's parameters and key, then split done from to-do.

Pure bookkeeping, no model: it runs before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .config import ConditioningConfig, MemoryConfig, ModelConfig
from .images import file_sha256
from .manifest import Item
from .params import GenParams, resolve_params
from .store import RunStore, item_key


@dataclass(frozen=True)
class PlannedItem:
    item: Item
    params: GenParams
    image_sha256: str
    key: str


@dataclass
class Plan:
    todo: list[PlannedItem] = field(default_factory=list)
    done: list[PlannedItem] = field(default_factory=list)


def plan_items(
    items: list[Item],
    cond: ConditioningConfig,
    model: ModelConfig,
    memory: MemoryConfig,
    model_identity: dict[str, Any],
    limit: Optional[int] = None,
) -> list[PlannedItem]:
    """Resolve each item's parameters and key (hashing each source image once)."""
    planned = []
    for item in items[:limit] if limit is not None else items:
        params = resolve_params(cond, model, memory, item.overrides)
        image_sha256 = file_sha256(item.image)
        key = item_key(image_sha256, params.as_dict(), item.seed, model_identity)
        planned.append(PlannedItem(item=item, params=params, image_sha256=image_sha256, key=key))
    return planned


def split_done(planned: list[PlannedItem], store: RunStore) -> Plan:
    index = store.finished_index()
    plan = Plan()
    for entry in planned:
        (plan.done if store.is_done(entry.item.id, entry.key, index) else plan.todo).append(entry)
    return plan
