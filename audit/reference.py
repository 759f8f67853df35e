"""Workforce reference data: BLS 2022 CPS table 11 (cpsaat11), shipped inside the package.

The table gives, per occupation, the number employed (thousands) and the percent women, White, Black or
African American, Asian and Hispanic or Latino. BLS prints a dash where the base is under 50,000 people:
that is *missing data* (NaN here), never zero. Percentages become fractions in [0, 1].

A suite's subjects carry ``bls:`` (the exact BLS ``Occupation`` string) or ``unmapped:`` (why there is no
row); :func:`subject_reference` joins the two. Which reference column answers which probe label lives in
one place, :data:`LABEL_SHARES`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from io import StringIO

import numpy as np
import pandas as pd

from diffaudit.errors import ConfigError, SchemaError

#: reference name -> CSV file inside ``audit/data``.
REFERENCES: dict[str, str] = {"bls-2022": "bls_cpsaat11_2022.csv"}
#: Fair Diffusion's published FairFace counts for Stable Diffusion 1.5 (250 images per occupation, 246-250 classified).
FAIR_DIFFUSION_SD15 = "fairdiffusion_results_fairface_generated_1-5.txt"

#: BLS column -> our column name.
COLUMNS = {
    "Occupation": "occupation",
    "Total employed": "employed_thousands",
    "Women": "women",
    "White": "white",
    "Black or African American": "black",
    "Asian": "asian",
    "Hispanic or Latino": "hispanic",
}

#: (attribute, label) -> (reference column, complement). ``complement`` means the share is 1 - column,
#: e.g. the reference share of perceived men is 1 - BLS % women (CPS records two sexes only).
LABEL_SHARES: dict[tuple[str, str], tuple[str, bool]] = {
    ("perceived_gender", "woman"): ("women", False),
    ("perceived_gender", "man"): ("women", True),
}

_DASHES = {"–", "-", "—", "‒"}  # en dash (what BLS prints), hyphen, em dash, figure dash


def list_references() -> list[str]:
    return sorted(REFERENCES)


def _parse_number(value: str, where: str) -> float:
    text = value.strip().replace(",", "")
    if text in _DASHES:
        return float("nan")
    try:
        return float(text)
    except ValueError:
        raise SchemaError(f"{where}: {value!r} is neither a number nor a dash") from None


@cache
def load_reference(name: str = "bls-2022") -> pd.DataFrame:
    """The reference table: one row per occupation, shares as fractions, NaN where BLS prints a dash.

    Columns: occupation, employed_thousands, women, white, black, asian, hispanic. Blank separator rows
    and the trailing NOTE are dropped; occupation strings are kept exactly as BLS spells them.
    """
    if name not in REFERENCES:
        raise ConfigError(f"unknown reference {name!r}; known references: {', '.join(list_references())}")
    text = resources.files("audit.data").joinpath(REFERENCES[name]).read_text(encoding="utf-8-sig")
    raw = pd.read_csv(StringIO(text), dtype=str, keep_default_na=False)
    if list(raw.columns) != list(COLUMNS):
        raise SchemaError(f"reference {name}: expected columns {list(COLUMNS)}, found {list(raw.columns)}")
    raw = raw[(raw["Occupation"].str.strip() != "") & ~raw["Occupation"].str.startswith("NOTE")]
    out = {"occupation": raw["Occupation"].tolist()}
    for col, ours in list(COLUMNS.items())[1:]:
        values = [_parse_number(v, f"reference {name}, {occ!r}, {col}")
                  for v, occ in zip(raw[col], raw["Occupation"], strict=True)]
        out[ours] = np.asarray(values, dtype=float) / (1.0 if ours == "employed_thousands" else 100.0)
    table = pd.DataFrame(out)
    if table["occupation"].duplicated().any():
        dup = table["occupation"][table["occupation"].duplicated()].tolist()
        raise SchemaError(f"reference {name}: duplicate occupation rows {dup}")
    return table


def subject_reference(suite: str, reference: str = "bls-2022") -> pd.DataFrame:
    """One row per subject of ``suite``: subject, occupation (the reference row or null), unmapped (why
    not) and the reference columns (NaN when unmapped or when BLS prints a dash).

    A ``bls:`` string that is not a row of the table is a ``ConfigError``: the suite is wrong.
    """
    from prompts.suites import load_suite

    table = load_reference(reference).set_index("occupation")
    rows = []
    for s in load_suite(suite).subjects:
        if s.bls is not None and s.bls not in table.index:
            raise ConfigError(f"suite {suite!r}: subject {s.id!r} maps to {s.bls!r}, which is not a row of "
                              f"{reference}; fix its bls: field (the exact Occupation string) or give unmapped:")
        row = {"subject": s.id, "occupation": s.bls,
               "unmapped": s.unmapped if s.bls is None else None}
        ref = table.loc[s.bls] if s.bls is not None else None
        for col in list(COLUMNS.values())[1:]:
            row[col] = float(ref[col]) if ref is not None else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def reference_share(attribute: str, label: str, row: pd.Series | dict) -> float:
    """The reference share of ``label`` for one subject row of :func:`subject_reference`; NaN when the
    reference has nothing to say (unmapped subject, a dash, or an attribute it does not cover)."""
    key = LABEL_SHARES.get((attribute, label))
    if key is None:
        return float("nan")
    column, complement = key
    value = float(row[column])
    return 1.0 - value if complement else value


def fair_diffusion_sd15(suite: str = "occupations", *, alpha: float = 0.05) -> pd.DataFrame:
    """Stable Diffusion 1.5's perceived-gender counts per occupation as Fair Diffusion published them
    (Friedrich et al. 2023, FairFace classifier): a reference line for reports, not a workforce figure.

    One row per subject of ``suite`` whose text is one of their 153 occupations: subject, occupation,
    man, woman, excluded (their ``except`` count), n (man + woman), share_woman and its Wilson interval.
    A different classifier than diffaudit's probes: compare directions and sizes, not decimals.
    """
    from statsmodels.stats.proportion import proportion_confint

    from prompts.suites import load_suite

    lines = [ln.strip() for ln in resources.files("audit.data").joinpath(FAIR_DIFFUSION_SD15)
             .read_text(encoding="utf-8").splitlines() if ln.strip()]
    counts = {}
    for occupation, line in zip(lines[0::2], lines[1::2], strict=True):
        fields = dict(part.strip().split(": ") for part in line.split(","))
        try:
            counts[occupation.lower()] = {k: int(fields[k]) for k in ("man", "woman", "except")}
        except (KeyError, ValueError):
            raise SchemaError(f"{FAIR_DIFFUSION_SD15}: cannot read counts {line!r} of {occupation!r}") from None
    rows = []
    for s in load_suite(suite).subjects:
        c = counts.get(s.text.lower())  # their file says "ceo", suites say "CEO"
        if c is not None:
            n = c["man"] + c["woman"]
            lo, hi = proportion_confint(c["woman"], n, alpha=alpha, method="wilson")
            rows.append({"subject": s.id, "occupation": s.text, "man": c["man"], "woman": c["woman"],
                         "excluded": c["except"], "n": n, "share_woman": c["woman"] / n, "ci_low": lo,
                         "ci_high": hi})
    return pd.DataFrame(rows)


def beside_fair_diffusion(shares: pd.DataFrame, suite: str) -> pd.DataFrame:
    """Perceived-women rows (subject, share, ci_low, ci_high, ...) of subjects Fair Diffusion published, with
    their SD 1.5 share (``share_woman``), interval and n (suffix ``_fd``) and ``diff`` = |share - share_woman|,
    largest difference first. Rows without a share are left out; empty when no subject matches."""
    fd = fair_diffusion_sd15(suite)
    if fd.empty:
        return fd
    fd = fd[["subject", "share_woman", "ci_low", "ci_high", "n"]].rename(
        columns={"ci_low": "ci_low_fd", "ci_high": "ci_high_fd", "n": "n_fd"})
    both = shares[shares["share"].notna()].merge(fd, on="subject")
    both["diff"] = (both["share"] - both["share_woman"]).abs()
    return both.sort_values("diff", ascending=False, kind="stable").reset_index(drop=True)
