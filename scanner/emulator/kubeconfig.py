"""Kubeconfig files that point the real `kubernetes` client at emulated apiservers.

Files are written 0600, as kubectl writes them, because they carry bearer tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import yaml

from scanner.emulator.resources import JsonDict

Entries = tuple[JsonDict, JsonDict, JsonDict]
"""The (cluster, user, context) entries of one context."""


class KubeconfigSource(Protocol):
    """What `write_kubeconfig` needs of an emulator (a `KubeEmulator`), without importing it."""

    def kubeconfig_entries(self, *, context: str = ..., token: str | None = ...) -> Entries: ...


def _read_config(path: Path) -> JsonDict:
    if not path.exists():
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [],
            "users": [],
            "contexts": [],
        }
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not a kubeconfig")
    return loaded


def write_config(path: Path, config: JsonDict) -> None:
    """Write `config` (clusters, users, contexts, ...) as a whole kubeconfig file."""
    full: JsonDict = {"apiVersion": "v1", "kind": "Config", "preferences": {}}
    full.update(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(full, sort_keys=False), encoding="utf-8")
    path.chmod(0o600)


def merge_entries(path: Path, entries: Entries, *, context: str, current: bool) -> Path:
    """Add (or replace, by name) one context's entries in the kubeconfig at `path`.

    `context` becomes current-context when `current` or when the file had none.
    """
    config = _read_config(path)
    cluster, user, ctx = entries
    for section, entry in (("clusters", cluster), ("users", user), ("contexts", ctx)):
        kept = [e for e in config.get(section) or [] if e.get("name") != entry["name"]]
        kept.append(entry)
        config[section] = kept
    if current or not config.get("current-context"):
        config["current-context"] = context
    write_config(path, config)
    return path


def write_kubeconfig(
    path: Path | str,
    emulators: Mapping[str, KubeconfigSource] | Sequence[tuple[str, KubeconfigSource]],
    *,
    current_context: str | None = None,
    token: str | None = None,
) -> Path:
    """Write ONE kubeconfig with one context per emulator (context name -> emulator).

    Cluster and user entries are named after the context. The current-context is
    `current_context` or the first one.
    """
    pairs = list(emulators.items()) if isinstance(emulators, Mapping) else list(emulators)
    if not pairs:
        raise ValueError("no emulators given")
    config: JsonDict = {"clusters": [], "users": [], "contexts": []}
    for context, emu in pairs:
        cluster, user, ctx = emu.kubeconfig_entries(context=context, token=token)
        config["clusters"].append(cluster)
        config["users"].append(user)
        config["contexts"].append(ctx)
    config["current-context"] = current_context or pairs[0][0]
    target = Path(path)
    write_config(target, config)
    return target
