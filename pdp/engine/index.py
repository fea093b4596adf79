"""``data.abc.index``: the manifest keyed by target, sharded so lookups stay cheap.

rego-cpp 1.5.2 looks a key up in an object by scanning it (measured: the last of
1,000 keys costs ~0.75 ms, the first ~0.03 ms), so one flat table keyed by target
grows with the manifest. Each target is filed under the first two hex digits of
its sha256 (16 x 16 shards): at 1,000 capabilities a lookup scans ~40 keys. The
policy computes the same shard with ``crypto.sha256``.

Each capability lists the steps that use it, so "is this allowed in the current
step" is one more small lookup, not a scan of the step's list.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pdp.manifest.model import Manifest

__all__ = ["policy_data", "shard"]


def shard(target: str) -> tuple[str, str]:
    digest = hashlib.sha256(target.encode("utf-8")).hexdigest()
    return digest[0], digest[1]


def _capabilities(manifest: Manifest) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for model in manifest.capabilities.models:
        entries[model.target] = {"kind": "model", "max_tokens_per_call": model.max_tokens_per_call}
    for tool in manifest.capabilities.tools:
        entries[tool.target] = {
            "kind": "tool",
            "args": {
                name: c.model_dump(mode="json", exclude_none=True) for name, c in tool.args.items()
            },
        }
    for rule in manifest.capabilities.http:
        entry = entries.setdefault(rule.target, {"kind": "http", "rules": []})
        entry["rules"].append({"methods": list(rule.methods), "path_prefix": rule.path_prefix})
    for entry in entries.values():
        entry["steps"] = {}
    for step in manifest.assembly.steps:
        for target in step.uses:
            entries[target]["steps"][step.id] = True
    return entries


def policy_data(manifest: Manifest) -> dict[str, Any]:
    """The whole data document, in one piece: regopy's ``add_data`` does not deep-merge."""
    targets: dict[str, dict[str, dict[str, Any]]] = {}
    for target, entry in _capabilities(manifest).items():
        first, second = shard(target)
        targets.setdefault(first, {}).setdefault(second, {})[target] = entry
    steps = {s.id: {"after": list(s.after)} for s in manifest.assembly.steps}
    return {"abc": {"manifest": manifest.document(), "index": {"targets": targets, "steps": steps}}}
