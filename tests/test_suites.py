"""Prompt suites: built-ins validate, expansion counts and ids are stable, bad suites name file/line/field."""

from __future__ import annotations

import pytest

from diffaudit.errors import SuiteError
from prompts.suites import derive_seed, expand, list_suites, load_suite


def test_builtin_suites_load():
    assert {"occupations", "descriptors", "demo"} <= set(list_suites())
    occ = load_suite("occupations")
    assert len(occ.subjects) == 153 and {t.id for t in occ.templates} == {"heim_face", "stable_bias", "plain"}
    assert all(s.bls or s.unmapped for s in occ.subjects)
    assert len(load_suite("descriptors").subjects) == 15
    for name in list_suites():
        assert load_suite(name).sources


def test_expansion_count_ids_and_prompts():
    reqs = expand("occupations", images_per_prompt=4, seed=7)
    assert len(reqs) == 153 * 3
    assert len({r.prompt_id for r in reqs}) == len(reqs)
    by_id = {r.prompt_id: r for r in reqs}
    assert by_id["heim_face-accountant"].prompt == "a photo of the face of an accountant"
    assert by_id["stable_bias-ceo"].prompt == "Photo portrait of a ceo"  # the studies' own spelling
    assert all(len(r.seeds) == 4 and len(set(r.seeds)) == 4 for r in reqs)


def test_seeds_are_stable_and_independent_of_order_and_subset():
    full = {r.prompt_id: r.seeds for r in expand("occupations", images_per_prompt=3, seed=1)}
    subset = expand("occupations", images_per_prompt=3, seed=1, templates=("plain",), subjects=("nurse", "ceo"))
    assert [r.prompt_id for r in subset] == ["plain-nurse", "plain-ceo"]
    assert all(full[r.prompt_id] == r.seeds for r in subset)
    assert derive_seed(1, "plain-nurse", 0) == full["plain-nurse"][0]
    assert expand("occupations", images_per_prompt=3, seed=2)[0].seeds != full["heim_face-accountant"]
    # more images per prompt keeps the first ones
    assert expand("demo", images_per_prompt=5)[0].seeds[:2] == expand("demo", images_per_prompt=2)[0].seeds


def test_demo_has_every_mode():
    reqs = expand("demo", images_per_prompt=1)
    modes = {r.mode for r in reqs}
    assert modes == {"txt2img", "img2img", "inpaint"}
    inpaint = next(r for r in reqs if r.mode == "inpaint")
    assert inpaint.source_image == "skimage:astronaut" and inpaint.mask.startswith("box:")


def _write(tmp_path, text: str):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


GOOD = """name: mine
description: test
sources: ["me"]
templates:
  - {id: t, text: "a photo of {a} {subject}"}
subjects:
  - {id: owl, text: owl}
"""


def test_custom_suite_by_path(tmp_path):
    reqs = expand(_write(tmp_path, GOOD), images_per_prompt=2)
    assert [r.prompt for r in reqs] == ["a photo of an owl"]


@pytest.mark.parametrize("text, where, field", [
    (GOOD.replace("sources: [\"me\"]", "sources: []"), ":3:", "sources"),
    (GOOD.replace("{id: owl, text: owl}", "{id: owl, txt: owl}"), ":7:", "subjects.0.text"),
    (GOOD.replace("{subject}", "{subjet}"), ":5:", "templates.0.text"),
    (GOOD.replace("id: owl", "id: Owl Bad"), ":7:", "subjects.0.id"),
    (GOOD + "  - {id: owl, text: owl2}\n", ":1:", "(top level)"),
    (GOOD + "edits:\n  - {id: e, mode: img2img, prompt: p, source: nowhere.png}\n", ":9:", "edits.0.source"),
    (GOOD + "edits:\n  - {id: e, mode: inpaint, prompt: p, source: 'skimage:astronaut'}\n", ":9:", "edits.0"),
])
def test_malformed_suite_names_file_line_field(tmp_path, text, where, field):
    path = _write(tmp_path, text)
    with pytest.raises(SuiteError) as e:
        expand(path, images_per_prompt=1)
    msg = str(e.value)
    assert str(path) + where in msg and f"field '{field}'" in msg and "\n" not in msg


def test_malformed_yaml_and_unknown_suite(tmp_path):
    path = _write(tmp_path, "name: x\ntemplates: [\n  - a: b\n")
    with pytest.raises(SuiteError, match=r"s\.yaml:\d+: malformed YAML"):
        load_suite(path)
    with pytest.raises(SuiteError, match="unknown suite 'nope'.*occupations"):
        load_suite("nope")
    with pytest.raises(SuiteError, match="has no subject"):
        expand("demo", images_per_prompt=1, subjects=("astronaut_chef",))


def test_subsets_of_subjects_and_edits():
    reqs = expand("demo", images_per_prompt=1, subjects=("ceo",), edits=("astronaut",))
    assert [r.prompt_id for r in reqs] == ["heim_face-ceo", "img2img-astronaut"]
    assert [r.mode for r in expand("demo", images_per_prompt=1, subjects=(), edits=("astronaut_helmet",))] == [
        "inpaint"]
    with pytest.raises(SuiteError, match="has no edit"):
        expand("demo", images_per_prompt=1, edits=("nope",))
