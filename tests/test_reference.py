"""audit.reference: the BLS 2022 table is parsed with dashes as missing data, known rows give known values,
and every occupation of the suites maps to a row or says why not."""

from __future__ import annotations

import csv
from importlib import resources

import numpy as np
import pandas as pd
import pytest

from audit import reference
from diffaudit.errors import ConfigError, DiffauditError, SchemaError
from prompts.suites import load_suite


def raw_rows() -> list[dict[str, str]]:
    text = resources.files("audit.data").joinpath("bls_cpsaat11_2022.csv").read_text(encoding="utf-8-sig")
    return [r for r in csv.DictReader(text.splitlines()) if r["Occupation"] and not r["Occupation"].startswith("NOTE")]


def test_dashes_are_missing_data_not_zero():
    table = reference.load_reference("bls-2022")
    raw = raw_rows()
    assert len(table) == len(raw) == 595
    dashed = [r["Occupation"] for r in raw if r["Women"].strip() == "–"]
    assert len(dashed) > 100  # BLS prints a dash below a 50,000 base: many small occupations
    women = table.set_index("occupation")["women"]
    assert women[dashed].isna().all()
    assert not (women == 0).any(), "a dash must never become 0"
    assert women.notna().sum() == len(raw) - len(dashed)
    legislators = table.set_index("occupation").loc["Legislators"]
    assert legislators["employed_thousands"] == 14 and np.isnan(legislators["women"])


@pytest.mark.parametrize("text", ["–", "-", "—", " – "])
def test_every_dash_spelling_parses_as_nan(text):
    assert np.isnan(reference._parse_number(text, "test"))


def test_garbage_cell_is_a_schema_error():
    with pytest.raises(SchemaError, match="neither a number nor a dash"):
        reference._parse_number("n/a", "test")


@pytest.mark.parametrize(("occupation", "employed", "women", "black"), [
    ("Chief executives", 1780, 0.292, 0.059),
    ("Total, 16 years and over", 158291, 0.468, 0.126),
    ("Registered nurses", 3363, 0.879, 0.145),
    ("Electricians", 918, 0.022, 0.073),
])
def test_known_rows_give_known_values(occupation, employed, women, black):
    row = reference.load_reference().set_index("occupation").loc[occupation]
    assert row["employed_thousands"] == employed
    assert row["women"] == pytest.approx(women) and row["black"] == pytest.approx(black)


def test_occupations_suite_maps_every_subject_or_says_why_not(capsys):
    suite = load_suite("occupations")
    assert len(suite.subjects) == 153
    refs = reference.subject_reference("occupations")
    table = set(reference.load_reference()["occupation"])
    mapped = refs[refs.occupation.notna()]
    assert set(mapped.occupation) <= table
    unmapped = refs[refs.occupation.isna()]
    assert unmapped.unmapped.notna().all() and (unmapped.unmapped.str.len() > 20).all()
    with capsys.disabled():
        print(f"\n{len(unmapped)} of 153 occupations have no BLS row:")
        for r in unmapped.itertuples():
            print(f"  {r.subject}: {r.unmapped}")
    assert sorted(unmapped.subject) == sorted(s.id for s in suite.subjects if s.bls is None)
    assert len(unmapped) == 16
    no_share = mapped[mapped.women.isna()]
    assert no_share.empty, f"mapped to a dashed BLS row (no % women): {list(no_share.subject)}"


def test_demo_suite_is_fully_mapped():
    refs = reference.subject_reference("demo").set_index("subject")
    assert refs.occupation.notna().all()
    assert refs.loc["ceo", "women"] == pytest.approx(0.292)


def test_reference_share_for_labels():
    row = pd.Series({"women": 0.292})
    assert reference.reference_share("perceived_gender", "woman", row) == pytest.approx(0.292)
    assert reference.reference_share("perceived_gender", "man", row) == pytest.approx(0.708)
    assert np.isnan(reference.reference_share("perceived_age", "young_adult", row))
    assert np.isnan(reference.reference_share("perceived_gender", "woman", {"women": float("nan")}))


def test_unknown_reference_and_bad_mapping_are_errors(tmp_path):
    with pytest.raises(DiffauditError, match="unknown reference 'census-1990'.*bls-2022"):
        reference.load_reference("census-1990")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ndescription: x\nsources: [x]\n"
        "templates: [{id: t, text: 'a photo of {a} {subject}'}]\n"
        "subjects: [{id: ceo, text: CEO, bls: 'Chief executive officers'}]\n")
    with pytest.raises(ConfigError, match="'Chief executive officers', which is not a row"):
        reference.subject_reference(str(bad))


def test_fair_diffusion_sd15_reference_line():
    fd = reference.fair_diffusion_sd15("occupations").set_index("subject")
    assert len(fd) == 153 and (fd.n == 250).sum() == 151 and fd.n.between(240, 250).all()
    acc = fd.loc["accountant"]
    assert (acc.man, acc.woman) == (166, 84) and acc.share_woman == pytest.approx(84 / 250)
    assert acc.ci_low < acc.share_woman < acc.ci_high
    assert set(reference.fair_diffusion_sd15("demo").subject) == {"ceo", "software_developer", "lawyer", "pilot",
                                                                   "electrician", "firefighter", "janitor", "cashier",
                                                                   "teacher", "librarian", "nurse", "hairdresser"}


def test_beside_fair_diffusion_matches_sorts_and_drops_missing_shares():
    import pandas as pd

    shares = pd.DataFrame({"subject": ["ceo", "nurse", "pilot", "astronaut"], "share": [0.5, 0.9, None, 0.3],
                           "ci_low": [0.4, 0.8, None, 0.2], "ci_high": [0.6, 0.95, None, 0.4]})
    both = reference.beside_fair_diffusion(shares, "demo")
    fd = reference.fair_diffusion_sd15("demo").set_index("subject")
    assert both["subject"].tolist() == ["ceo", "nurse"]  # no share (pilot) and not published (astronaut): out
    assert both.loc[0, "diff"] == pytest.approx(abs(0.5 - fd.loc["ceo", "share_woman"]))
    assert both["diff"].is_monotonic_decreasing and both.loc[1, "n_fd"] == fd.loc["nurse", "n"]
