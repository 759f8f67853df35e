"""audit.validation: sensitivity/specificity with statsmodels Wilson intervals on a known confusion matrix,
Rogan-Gladen recovering a known true share from misclassified data, and the ``probe validate`` CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.proportion import proportion_confint

from audit import stats
from audit.validation import correct_summary, read_labels, rogan_gladen, validate_probe
from diffaudit.errors import InputError
from tests.conftest import make_photo_run


def probe_table(image_ids, predicted, abstained=None) -> pd.DataFrame:
    abstained = np.zeros(len(image_ids), bool) if abstained is None else np.asarray(abstained)
    return pd.DataFrame(dict(
        image_id=list(image_ids), face_index=-1, bbox=None, attribute="perceived_gender",
        label=[None if a else p for p, a in zip(predicted, abstained, strict=True)], score=0.9, margin=0.3,
        abstained=abstained, abstain_reason=[("low_margin" if a else None) for a in abstained], probe="clip",
        probe_version="1"))


def confusion(tp: int, fn: int, fp: int, tn: int, abstain_pos: int = 0):
    """Labels and predictions for class 'woman' with a known confusion matrix (+ abstentions among women)."""
    truth = ["woman"] * (tp + fn + abstain_pos) + ["man"] * (fp + tn)
    pred = ["woman"] * tp + ["man"] * fn + ["man"] * abstain_pos + ["woman"] * fp + ["man"] * tn
    abst = [False] * (tp + fn) + [True] * abstain_pos + [False] * (fp + tn)
    ids = [f"i{k}" for k in range(len(truth))]
    return pd.DataFrame({"image_id": ids, "label": truth}), probe_table(ids, pred, abst)


def test_known_confusion_matrix_gives_wilson_intervals():
    labels, table = confusion(tp=40, fn=10, fp=6, tn=54, abstain_pos=5)
    v = validate_probe(labels, table, attribute="perceived_gender").set_index("class")
    w = v.loc["woman"]
    assert (w.tp, w.fn, w.fp, w.tn, w.positives, w.abstained) == (40, 10, 6, 54, 50, 5)
    assert w.sensitivity == pytest.approx(0.8) and w.specificity == pytest.approx(0.9)
    assert (w.sensitivity_ci_low, w.sensitivity_ci_high) == pytest.approx(proportion_confint(40, 50, method="wilson"))
    assert (w.specificity_ci_low, w.specificity_ci_high) == pytest.approx(proportion_confint(54, 60, method="wilson"))
    assert w.abstention_rate == pytest.approx(5 / 55)
    m = v.loc["man"]  # one against the rest: man's sensitivity is woman's specificity
    assert m.sensitivity == pytest.approx(0.9) and m.specificity == pytest.approx(0.8)


def test_unknown_classes_are_named():
    labels, table = confusion(5, 1, 1, 5)
    labels.loc[0, "label"] = "womn"
    labels.loc[1, "label"] = "nonbinary"
    with pytest.raises(InputError, match=r"unknown class\(es\) \['nonbinary', 'womn'\].*man, woman"):
        validate_probe(labels, table, attribute="perceived_gender")
    labels.loc[[0, 1], "label"] = "woman"
    v = validate_probe(labels, table, attribute="perceived_gender", classes=["woman", "man", "unsure"])
    assert set(v["class"]) == {"woman", "man", "unsure"}


def test_labels_file_by_path_and_bad_files(tmp_path):
    gens = pd.DataFrame({"image_id": ["a-1", "b-2"], "path": ["images/a/1.png", "images/b/2.png"]})
    good = tmp_path / "labels.csv"
    good.write_text("path,label\nimages/a/1.png,woman\n" + f"{tmp_path / 'run' / 'images/b/2.png'},man\n")
    v = validate_probe(good, probe_table(["a-1", "b-2"], ["woman", "woman"]), attribute="perceived_gender",
                       classes=["woman", "man"], generations=gens, run_root=tmp_path / "run").set_index("class")
    assert v.loc["woman", "tp"] == 1 and v.loc["man", "fn"] == 1
    for text, message in [("image,label\nx,woman\n", "needs a 'label' column"),
                          ("image_id,label\na-1,\n", "row 2 has an empty"),
                          ("image_id,label\na-1,woman\na-1,man\n", "labelled twice")]:
        good.write_text(text)
        with pytest.raises(InputError, match=message):
            read_labels(good)
    with pytest.raises(InputError, match="does not exist"):
        read_labels(tmp_path / "missing.csv")
    good.write_text("path,label\nimages/zzz.png,woman\n")
    with pytest.raises(InputError, match="not images of this run"):
        validate_probe(good, probe_table(["a-1"], ["woman"]), attribute="perceived_gender", generations=gens)


def test_rogan_gladen_recovers_a_known_true_share():
    rng = np.random.default_rng(2024)
    true_share, se, sp = 0.20, 0.85, 0.85
    # Validation set: 600 labelled images from the same probe.
    v_truth = rng.random(600) < 0.5
    v_pred = np.where(v_truth, rng.random(600) < se, rng.random(600) > sp)
    ids = [f"v{k}" for k in range(600)]
    labels = pd.DataFrame({"image_id": ids, "label": np.where(v_truth, "woman", "man")})
    val = validate_probe(labels, probe_table(ids, np.where(v_pred, "woman", "man")), attribute="perceived_gender")
    w = val.set_index("class").loc["woman"]
    # The audit: 20,000 images whose true share of women is 0.20, seen through the same probe.
    a_truth = rng.random(20_000) < true_share
    observed = np.mean(np.where(a_truth, rng.random(20_000) < se, rng.random(20_000) > sp))
    assert abs(observed - true_share) > 0.06  # misclassification visibly biases the raw share
    r = rogan_gladen(observed, w.sensitivity, w.specificity, n=20_000, positives=int(w.positives),
                     negatives=int(w.tn + w.fp), seed=1)
    assert abs(r.estimate - true_share) < 0.03
    assert r.ci_low <= true_share <= r.ci_high
    plain_lo, plain_hi = proportion_confint(observed * 20_000, 20_000, method="wilson")
    assert (r.ci_high - r.ci_low) > (plain_hi - plain_lo)  # carries the validation uncertainty too


def test_rogan_gladen_interval_coverage_by_simulation():
    rng = np.random.default_rng(99)
    true_share, se, sp, n, npos, nneg = 0.4, 0.8, 0.9, 300, 150, 150
    hits = 0
    for _ in range(150):
        obs = rng.binomial(n, true_share * se + (1 - true_share) * (1 - sp)) / n
        r = rogan_gladen(obs, rng.binomial(npos, se) / npos, rng.binomial(nneg, sp) / nneg, n=n, positives=npos,
                         negatives=nneg, n_boot=2000, seed=int(rng.integers(1 << 30)))
        hits += r.ci_low <= true_share <= r.ci_high
    assert hits / 150 >= 0.88  # nominal 95%; 150 replicates leave a few points of noise


def test_rogan_gladen_rejects_a_useless_probe_and_clips():
    with pytest.raises(InputError, match="no better than chance"):
        rogan_gladen(0.4, 0.5, 0.5, n=100, positives=50, negatives=50)
    assert rogan_gladen(0.02, 0.9, 0.9, n=100, positives=50, negatives=50).estimate == 0.0


def test_corrected_summary_shares_sum_to_one():
    gens = pd.DataFrame([dict(image_id=f"g{k}", subject="ceo", template="t") for k in range(50)])
    table = probe_table(gens.image_id, ["woman"] * 15 + ["man"] * 35)
    summary = stats.summarize(gens, {"clip": table}, suite="demo")
    labels, vt = confusion(tp=40, fn=10, fp=6, tn=54)
    val = validate_probe(labels, vt, attribute="perceived_gender")
    fixed = correct_summary(summary[summary.template == "all"], val, probe="clip", attribute="perceived_gender")
    assert len(fixed) == 2 and fixed.corrected_share.sum() == pytest.approx(1.0)
    woman = fixed.set_index("label").loc["woman"]
    assert woman.corrected_share == pytest.approx((0.3 + 0.9 - 1) / (0.8 + 0.9 - 1))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from diffaudit.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(args))
    out = capsys.readouterr()
    return done.value.code or 0, out.out, out.err


def test_probe_validate_cli(tmp_path, capsys):
    run = make_photo_run(tmp_path / "run", photos=("astronaut", "coffee", "chelsea", "camera"), size=32)
    gens = run.read_table("generations")
    run.write_table("probes/clip", probe_table(gens.image_id, ["woman", "man", "man", "man"]))
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,label\n" + "\n".join(f"{i},{lab}" for i, lab in
                                                    zip(gens.image_id, ["woman", "man", "woman", "man"], strict=True)))
    code, out, err = run_cli(capsys, "probe", "validate", "--labels", str(labels), "--run", str(run.root),
                             "--probe", "clip", "--attribute", "perceived_gender")
    assert code == 0, err
    assert "woman" in out and "50.0%" in out and "100.0%" in out  # woman: sensitivity 1/2, specificity 2/2
    labels.write_text(f"image_id,label\n{gens.image_id[0]},female\n")
    code, _, err = run_cli(capsys, "probe", "validate", "--labels", str(labels), "--run", str(run.root))
    assert code == 2 and err.count("\n") == 1 and "['female']" in err
    code, _, err = run_cli(capsys, "probe", "validate", "--labels", str(labels), "--run", str(run.root),
                           "--probe", "faces")
    assert code == 2 and "no probes/faces table" in err


def test_probe_validate_defaults_to_the_registered_probes_classes(tmp_path, capsys):
    """The tiny CLIP may only ever say 'woman'; 'man' is still one of its classes."""
    run = make_photo_run(tmp_path / "run", photos=("astronaut", "coffee", "chelsea", "camera"), size=32)
    gens = run.read_table("generations")
    run.write_table("probes/clip", probe_table(gens.image_id, ["woman"] * 4))
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,label\n" + "\n".join(f"{i},{lab}" for i, lab in
                                                    zip(gens.image_id, ["woman", "man", "woman", "man"], strict=True)))
    code, out, err = run_cli(capsys, "probe", "validate", "--labels", str(labels), "--run", str(run.root))
    assert code == 0, err
    assert "man" in out.replace("woman", "") and "100.0%" in out  # woman: sensitivity 2/2


def test_correction_skips_a_class_without_labelled_votes(tmp_path, capsys):
    with pytest.raises(InputError, match="not estimable"):
        rogan_gladen(0.4, float("nan"), 0.9, n=100, positives=50, negatives=50)
    run = make_photo_run(tmp_path / "run", photos=("astronaut", "coffee", "chelsea", "camera"), size=32)
    gens = run.read_table("generations")
    table = probe_table(gens.image_id, ["woman", "man", "woman", "man"], abstained=[False, True, False, False])
    run.write_table("probes/clip", table)
    run.write_table("bias/summary", stats.summarize(gens, {"clip": table}, suite="demo"))
    labels = tmp_path / "labels.csv"  # the only 'man' is abstained on: man has no labelled vote
    labels.write_text("image_id,label\n" + "\n".join(f"{i},{lab}" for i, lab in
                                                    zip(gens.image_id[:3], ["woman", "man", "woman"], strict=True)))
    val = validate_probe(labels, table, attribute="perceived_gender", classes=["woman", "man"])
    summary = stats.summarize(gens, {"clip": table}, suite="demo")
    fixed = correct_summary(summary[summary.template == "all"], val, probe="clip", attribute="perceived_gender")
    assert fixed.corrected_share.isna().all() and fixed.corrected_note.str.contains("not estimable").all()
    code, out, err = run_cli(capsys, "probe", "validate", "--labels", str(labels), "--run", str(run.root))
    assert code == 0, err
    assert out.count("note: not corrected") == 2 and "error" not in err
