"""Item keys: everything that determines an item's frames (image bytes, parameters, seed,
model, preprocessing), hashed. A finished item whose key changed is redone; one of the same
key in another run dir can be reused (engine/sweep.py)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_VERSION = 2  # bump when what goes into a key changes meaning (2: preprocessing)


class KeyMaker:
    """Item keys for one model: everything that determines an item's frames, hashed.
    A changed key means redo. The model part is serialised once, not once per row.

    `preprocess` is how the source image is fitted to the target size (resize policy,
    pad and background colours): it changes the pipeline's input, so it changes frames."""

    def __init__(self, model: dict[str, Any]):
        self.prefix = f"svdbatch-key-v{KEY_VERSION}|{json.dumps(model, sort_keys=True)}|"
        self._preprocess_json: dict[Any, str] = {}
        self._params_text: dict[Any, str] = {}

    def __call__(self, image_sha256: str, params: Any, seed: int, preprocess: Any) -> str:
        """`params` and `preprocess` are hashable (GenParams, Preprocess): a run has few
        distinct ones, so each is serialised once, not once per row."""
        return self.key_with(image_sha256, seed, self.tail(params, preprocess))

    def key(self, image_sha256: str, params_text: str, seed: int, preprocess_json: str) -> str:
        return self.key_with(image_sha256, seed, f"{params_text}|{preprocess_json}")

    def tail(self, params: Any, preprocess: Any) -> str:
        """What a key shares with every item of these params and preprocessing (key_with)."""
        prep = self._preprocess_json.get(preprocess)
        if prep is None:
            prep = self._preprocess_json[preprocess] = json.dumps(preprocess.as_dict(), sort_keys=True)
        text = self._params_text.get(params)
        if text is None:
            text = self._params_text[params] = params_text(params.as_dict())
        return f"{text}|{prep}"

    def key_with(self, image_sha256: str, seed: int, tail: str) -> str:
        """The key from its per-item parts and a tail(): planning a million rows of few
        distinct settings serialises and hashes those settings once, not per row."""
        return hashlib.sha256(f"{self.prefix}{image_sha256}|{seed}|{tail}".encode()).hexdigest()


def params_text(params: dict[str, Any]) -> str:
    # repr() of ints and floats is exact and stable, and the params' order is fixed.
    return ",".join(f"{name}={value!r}" for name, value in params.items())


def item_key(image_sha256: str, params: dict[str, Any], seed: int, model: dict[str, Any], preprocess: dict[str, Any]) -> str:
    return KeyMaker(model).key(image_sha256, params_text(params), seed, json.dumps(preprocess, sort_keys=True))
