"""Plugin registries: name -> "module:attribute", imported only when used.

Adding a probe, hash or watermark method is one new file plus one line below. Entries are strings so
that ``diffaudit list probes`` costs nothing (no torch import). Prompt suites are registered by the
YAML files in ``prompts/`` (see ``prompts.suites``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from diffaudit.errors import RegistryError


def singular(kind: str) -> str:
    """"hashes" -> "hash", "probes" -> "probe": the name of one plugin of a kind, for messages."""
    if kind.endswith(("ses", "shes", "ches", "xes", "zes")):
        return kind[:-2]
    return kind[:-1] if kind.endswith("s") else kind


class Registry(Mapping[str, str]):
    """A named collection of plugins. Duplicate names are rejected; unknown names list what exists."""

    def __init__(self, kind: str, entries: Mapping[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, str] = {}
        for name, target in (entries or {}).items():
            self.register(name, target)

    def register(self, name: str, target: str) -> None:
        if name in self._entries:
            raise RegistryError(f"{self.kind}: {name!r} is already registered (as {self._entries[name]})")
        if ":" not in target:
            raise RegistryError(f"{self.kind}: target {target!r} must look like 'module:attribute'")
        self._entries[name] = target

    def load(self, name: str) -> Any:
        """Import and return the plugin registered as ``name``."""
        if name not in self._entries:
            raise RegistryError(f"unknown {singular(self.kind)} {name!r}; choose from: "
                                f"{', '.join(sorted(self._entries))}")
        module, _, attr = self._entries[name].partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def __getitem__(self, name: str) -> str:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


PROBES = Registry("probes", {
    "clip": "audit.probes.clip:ClipProbe",
    "faces": "audit.probes.faces:FaceProbe",
    "faces_attr": "audit.probes.face_attributes:FaceAttributeProbe",
    "skin_tone": "audit.probes.skin_tone:SkinToneProbe",
})

HASHES = Registry("hashes", {
    "phash": "audit.memorization.hashing:PHash",
    "dhash": "audit.memorization.hashing:DHash",
    "whash": "audit.memorization.hashing:WHash",
})

WATERMARKS = Registry("watermarks", {
    "ssTile": "provenance.watermark:SpreadTile",
    "dwtDctSvd": "provenance.watermark:DwtDctSvd",
    "dwtDct": "provenance.watermark:DwtDct",
    "rivaGan": "provenance.watermark:RivaGan",
    "trustMark": "provenance.watermark:TrustMark",  # user-supplied weights: $DIFFAUDIT_TRUSTMARK
})

REGISTRIES: dict[str, Registry] = {"probes": PROBES, "hashes": HASHES, "watermarks": WATERMARKS}
