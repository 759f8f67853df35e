"""diffaudit: responsible-AI audits of text-to-image diffusion models.

The core package holds what every stage shares: the run folder (`runs`), table schemas (`schema`),
configs (`config`), errors (`errors`), plugin registries (`registry`) and the CLI (`cli`).
"""

__version__ = "0.1.0"
