"""The audit stage: bias probes and statistics (``audit.probes``, ``audit.stats``, ``audit.bias``) and
memorization checks (``audit.memorization``). It reads a run only through ``diffaudit.runs``."""
