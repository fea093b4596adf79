"""``data.abc.index``: the manifest keyed by target, so the policy looks a capability up
instead of scanning a list (OPA's objects are hash tables: the cost does not grow with
the manifest).

Each capability lists the steps that use it, so "is this allowed in the current
step" is one more lookup, not a scan of the step's list.
"""

from __future__ import annotations

from typing import Any

from pdp.manifest.model import Manifest

__all__ = ["policy_data"]


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
    for resource in manifest.capabilities.resources:
        entries[resource.target] = {
            "kind": "resource",
            "server": resource.server,
            "uri_prefix": resource.uri_prefix,
        }
    for prompt in manifest.capabilities.prompts:
        entries[prompt.target] = {"kind": "prompt"}
    for entry in entries.values():
        entry["steps"] = {}
    for step in manifest.assembly.steps:
        for target in step.uses:
            entries[target]["steps"][step.id] = True
    return entries


# How many leading characters of a name the "closest names" table indexes, at least and
# at most; and how many names it keeps per prefix.
PREFIX_MIN, PREFIX_MAX, PREFIX_HITS = 3, 40, 3


def _prefixes(names: list[str]) -> dict[str, list[str]]:
    """``kind:prefix`` -> up to three names of that kind starting so, for explaining a refused
    name by its closest allowed ones. Comparing against every name in Rego costs ~1 ms a
    name (a second for 1,000 tools, on every refusal); this costs one lookup per length."""
    table: dict[str, list[str]] = {}
    for name in sorted(names):
        kind, _, bare = name.partition(":")
        for length in range(PREFIX_MIN, min(len(bare), PREFIX_MAX) + 1):
            hits = table.setdefault(f"{kind}:{bare[:length]}", [])
            if len(hits) < PREFIX_HITS:
                hits.append(name)
    return table


def policy_data(manifest: Manifest) -> dict[str, Any]:
    """The whole data document the policy reads beside its input."""
    capabilities = _capabilities(manifest)
    steps = {s.id: {"after": list(s.after)} for s in manifest.assembly.steps}
    names = [*capabilities, *(f"step:{step}" for step in steps)]
    resources: dict[str, list[str]] = {}
    for resource in manifest.capabilities.resources:
        resources.setdefault(resource.server, []).append(resource.target)
    index = {
        "targets": capabilities,
        # server -> its resource capabilities: a URI is granted by prefix, not looked up.
        "resources": resources,
        "steps": steps,
        "prefixes": _prefixes(names),
    }
    return {"abc": {"manifest": manifest.document(), "index": index}}
