"""The Streamlit dashboard: read-only pages over the run folders of one runs root.

``app.py`` is the entry point (``diffaudit dashboard RUNS_DIR``); ``data.py`` holds the only code that
touches the disk. Importing this package imports nothing heavy.
"""

RUNS_DIR_ENV = "DIFFAUDIT_RUNS_DIR"
