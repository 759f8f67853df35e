"""Registries: duplicate names rejected, unknown names list the choices, every built-in entry loads."""

from __future__ import annotations

import pytest

from diffaudit.errors import RegistryError
from diffaudit.registry import REGISTRIES, Registry


def test_duplicate_and_malformed_entries_are_rejected():
    reg = Registry("probes", {"a": "json:dumps"})
    with pytest.raises(RegistryError, match="'a' is already registered"):
        reg.register("a", "json:loads")
    with pytest.raises(RegistryError, match="module:attribute"):
        reg.register("b", "json.dumps")
    assert reg.load("a").__name__ == "dumps"
    with pytest.raises(RegistryError, match="unknown probe 'zzz'; choose from: a"):
        reg.load("zzz")


@pytest.mark.parametrize("kind, name", [(k, n) for k, reg in REGISTRIES.items() for n in reg])
def test_every_builtin_plugin_loads(kind, name):
    plugin = REGISTRIES[kind].load(name)
    assert isinstance(plugin, type), f"{kind}/{name} should register a class"
