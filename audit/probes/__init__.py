"""Bias probes: one file per probe, registered by name in ``diffaudit.registry.PROBES``.

A probe scores a batch of decoded images into rows of the ``PROBES`` table (see ``base.Probe``).
"""
