"""Table schemas of the run folder, in one place, versioned. Every write and every read validates.

A table is named by its path inside the run without the extension: ``generations``,
``probes/clip``, ``bias/summary``. Columns marked nullable may be left out by a writer (they are
filled with nulls); any other missing column, an unknown column or an uncastable type is a
``SchemaError``. Each file records the schema version it was written with.
"""

from __future__ import annotations

import fnmatch

import pandas as pd
import pyarrow as pa

from diffaudit.errors import SchemaError

SCHEMA_VERSION = 1
VERSION_KEY = b"diffaudit.schema_version"
TABLE_KEY = b"diffaudit.table"


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


_str = pa.string()
_f64 = pa.float64()
_i64 = pa.int64()
_i32 = pa.int32()
_bool = pa.bool_()

# --- generation (generate/) -------------------------------------------------------------------
GENERATIONS = pa.schema([
    _f("image_id", _str),            # "<prompt_id>-<seed>", stable across runs
    _f("prompt_id", _str),
    _f("suite", _str),
    _f("template", _str),            # template id, e.g. "heim_face"; "edit" for edit requests
    _f("subject", _str),             # e.g. the occupation
    _f("prompt", _str),
    _f("negative_prompt", _str),
    _f("mode", _str),                # txt2img | img2img | inpaint
    _f("source_image", _str, True),
    _f("mask", _str, True),
    _f("strength", _f64, True),
    _f("index", _i32),               # image index within its prompt
    _f("seed", _i64),
    _f("model", _str),
    _f("model_revision", _str, True),
    _f("scheduler", _str),
    _f("steps", _i32),
    _f("guidance", _f64),
    _f("width", _i32),
    _f("height", _i32),
    _f("path", _str),                # relative to the run folder
    _f("sha256", _str),
    _f("seconds", _f64),
    _f("nsfw", _bool, True),         # safety checker flag; null when no checker ran
])

# --- bias probes (audit/probes/) -------------------------------------------------------------
PROBES = pa.schema([
    _f("image_id", _str),
    _f("face_index", _i32),          # -1: the whole image
    _f("bbox", pa.list_(_f64), True),  # [x, y, w, h] in pixels; null for whole-image rows
    _f("attribute", _str),
    _f("label", _str, True),         # null when abstained
    _f("score", _f64, True),
    _f("margin", _f64, True),
    _f("abstained", _bool),
    _f("abstain_reason", _str, True),
    _f("probe", _str),
    _f("probe_version", _str),
])

# --- bias statistics (audit/stats.py, written by audit/bias.py) -----------------------------
BIAS_SUMMARY = pa.schema([
    _f("probe", _str),
    _f("attribute", _str),
    _f("subject", _str),
    _f("template", _str),            # a template id, or "all" when pooled
    _f("label", _str, True),         # null only when every image abstained on this attribute
    _f("count", _i64),
    _f("n", _i64),                   # non-abstained images for this subject x attribute
    _f("share", _f64, True),         # share and its Wilson interval: null when n == 0
    _f("ci_low", _f64, True),
    _f("ci_high", _f64, True),
    _f("sim_ci_low", _f64, True),    # simultaneous multinomial interval
    _f("sim_ci_high", _f64, True),
    _f("abstained", _i64),
    _f("abstention_rate", _f64),
    _f("reference", _str, True),     # e.g. "bls-2022"
    _f("reference_share", _f64, True),
    _f("gap", _f64, True),
    _f("gap_ci_low", _f64, True),
    _f("gap_ci_high", _f64, True),
    _f("p_value", _f64, True),
    _f("q_value", _f64, True),
    _f("amplified", _bool, True),
])

BIAS_METRICS = pa.schema([           # aggregate scores comparable with peers (audit.stats.metrics)
    _f("probe", _str),
    _f("attribute", _str),
    _f("template", _str),            # a template id, or "all" when pooled
    _f("subject", _str),             # a subject, or "all": the mean over subjects
    _f("metric", _str),              # gender_imbalance | mad | entropy | mean_abs_gap | amplified_share
    _f("value", _f64, True),
    _f("ci_low", _f64, True),        # percentile bootstrap over images within subjects
    _f("ci_high", _f64, True),
    _f("subjects", _i64),
    _f("n", _i64),                   # non-abstained images behind the value
])

# --- memorization (audit/memorization/) ------------------------------------------------------
MEMORIZATION_MATCHES = pa.schema([
    _f("image_id", _str),
    _f("prompt_id", _str),
    _f("train_key", _str),
    _f("train_uri", _str, True),
    _f("hamming", _i32),
    _f("tile_l2", _f64, True),
    _f("ssim", _f64, True),
    _f("embedding_sim", _f64, True),
    _f("verdict", _str),             # memorized | near_duplicate | unconfirmed
    _f("evidence_path", _str, True),  # relative path of the training-side evidence image
])

MEMORIZATION_RATES = pa.schema([
    _f("prompt_id", _str),
    _f("subject", _str),
    _f("images", _i64),
    _f("matched", _i64),
    _f("rate", _f64),
    _f("ci_low", _f64),
    _f("ci_high", _f64),
])

# --- provenance (provenance/) ----------------------------------------------------------------
PROVENANCE_STAMPS = pa.schema([
    _f("image_id", _str),
    _f("source_path", _str),
    _f("stamped_path", _str),
    _f("format", _str),
    _f("watermark", _str),           # method name or "none"
    _f("payload", _str, True),       # watermark payload, hex
    _f("manifest_label", _str, True),
    _f("sha256", _str),
    _f("phash", _str, True),
    _f("status", _str),              # Trusted | Valid | Invalid | none
    _f("trust", _str, True),         # who vouched for a Trusted stamp: "development root" (self-check) or a list
    _f("failure_codes", pa.list_(_str), True),
    _f("seconds", _f64),
])

PROVENANCE_ROBUSTNESS = pa.schema([
    _f("method", _str),
    _f("attack", _str),
    _f("images", _i64),
    _f("bit_accuracy", _f64),
    _f("detection_rate", _f64),
    _f("c2pa_survives", _f64, True),
    _f("credentials_recovered", _f64, True),  # embedded and valid, or found in the manifest store
])

TABLES: dict[str, pa.Schema] = {
    "generations": GENERATIONS,
    "probes/*": PROBES,
    "bias/summary": BIAS_SUMMARY,
    "bias/metrics": BIAS_METRICS,
    "memorization/matches": MEMORIZATION_MATCHES,
    "memorization/rates": MEMORIZATION_RATES,
    "provenance/stamps": PROVENANCE_STAMPS,
    "provenance/robustness": PROVENANCE_ROBUSTNESS,
}


def schema_for(table: str) -> pa.Schema:
    """The schema of a run table by name (``probes/clip`` matches ``probes/*``)."""
    if table in TABLES:
        return TABLES[table]
    for pattern, schema in TABLES.items():
        if fnmatch.fnmatchcase(table, pattern):
            return schema
    raise SchemaError(f"unknown table {table!r}; known tables: {', '.join(TABLES)}")


def to_arrow(table: str, df: pd.DataFrame) -> pa.Table:
    """Validate a DataFrame against its table schema and convert it, or raise ``SchemaError``."""
    schema = schema_for(table)
    names = set(schema.names)
    extra = [c for c in df.columns if c not in names]
    if extra:
        raise SchemaError(f"table {table!r}: unknown column(s) {extra}; the schema has {schema.names}")
    missing = [f.name for f in schema if f.name not in df.columns and not f.nullable]
    if missing:
        raise SchemaError(f"table {table!r}: missing required column(s) {missing}")
    df = df.reset_index(drop=True)
    for f in schema:
        if f.name not in df.columns:
            df[f.name] = None
    try:
        arrow = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
        raise SchemaError(f"table {table!r}: {e}") from e
    meta = {VERSION_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: table.encode()}
    return arrow.replace_schema_metadata(meta)


def check_arrow(table: str, arrow: pa.Table, origin: str) -> None:
    """Check a table read from disk: same version, same columns and types as the schema."""
    meta = arrow.schema.metadata or {}
    version = meta.get(VERSION_KEY)
    if version is None or int(version) != SCHEMA_VERSION:
        raise SchemaError(
            f"{origin}: schema version {version.decode() if version else 'missing'}, this diffaudit reads "
            f"version {SCHEMA_VERSION}; re-run the stage that wrote it"
        )
    expected = schema_for(table)
    got = arrow.schema.remove_metadata()
    if not got.equals(expected, check_metadata=False):
        diff = sorted(set(map(str, expected)) ^ set(map(str, got)))
        raise SchemaError(f"{origin}: columns do not match table {table!r}: {diff}")
