"""Rule labeller: a table of phrasings (negation, uncertainty, scope), the phantom grammar, IU X-ray agreement."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from helpers import load_script, shared_data

from medvlp_bench.config import ConfigError
from medvlp_bench.datasets import phantom_ct, phantom_cxr, phantom_mri
from medvlp_bench.report_labeler import VOCABULARIES, ReportLabeler, clauses, corpus_vocabulary, to_binary

NAN = math.nan
CHEX = ReportLabeler("chexpert")
PHANTOM = ReportLabeler("phantom_cxr")

# (report, {class: expected state}) with 1 positive, 0 negative, -1 uncertain, nan not mentioned
TABLE = [
    ("There is a small left pleural effusion.", {"pleural_effusion": 1}),
    ("No pleural effusion.", {"pleural_effusion": 0}),
    (
        "No focal consolidation, pleural effusion, or pneumothorax.",
        {"consolidation": 0, "pleural_effusion": 0, "pneumothorax": 0},
    ),
    ("Small effusion without pneumothorax.", {"pleural_effusion": 1, "pneumothorax": 0}),
    ("No pneumothorax, but there is a small effusion.", {"pneumothorax": 0, "pleural_effusion": 1}),
    ("No pneumothorax; small effusion.", {"pneumothorax": 0, "pleural_effusion": 1}),
    ("Effusion and pneumothorax are not seen.", {"pleural_effusion": 0, "pneumothorax": 0}),
    ("The pneumothorax has resolved.", {"pneumothorax": 0}),
    ("Free of pneumothorax.", {"pneumothorax": 0}),
    ("Negative for pneumonia.", {"pneumonia": 0}),
    ("Pneumothorax cannot be excluded.", {"pneumothorax": -1}),
    ("Cannot exclude pneumonia.", {"pneumonia": -1}),
    ("Possible right lower lobe pneumonia.", {"pneumonia": -1}),
    ("Findings suspicious for pneumonia.", {"pneumonia": -1}),
    ("Atelectasis or consolidation at the left base.", {"atelectasis": -1, "consolidation": -1}),
    ("Consolidation, likely pneumonia.", {"consolidation": 1, "pneumonia": -1}),
    ("No change in the small right effusion.", {"pleural_effusion": 1}),
    ("Heart size is normal.", {"cardiomegaly": 0}),
    ("The heart is not enlarged.", {"cardiomegaly": 0}),
    ("Mild cardiomegaly.", {"cardiomegaly": 1}),
    ("Borderline cardiomegaly.", {"cardiomegaly": -1}),
    ("Heart size at the upper limits of normal.", {"cardiomegaly": -1}),
    ("The lungs are clear.", {"consolidation": 0, "lung_opacity": 0, "pneumothorax": NAN}),
    ("Pericardial effusion.", {"pleural_effusion": NAN}),
    ("Endotracheal tube in good position.", {"support_devices": 1}),
    ("Old healed rib fracture.", {"fracture": 1}),
    ("Effusion. No effusion.", {"pleural_effusion": 1}),  # any positive mention wins
    ("Possible effusion. No effusion.", {"pleural_effusion": -1}),  # then uncertain, then negative
    ("No acute cardiopulmonary process.", {"no_finding": 1}),
    ("Cardiomegaly.", {"no_finding": 0}),
    ("Pacemaker leads in place.", {"no_finding": 1, "support_devices": 1}),  # devices do not count
]


@pytest.mark.parametrize(("text", "expected"), TABLE, ids=[t for t, _ in TABLE])
def test_phrasing_table(text: str, expected: dict[str, float]) -> None:
    got = CHEX(text)
    for name, want in expected.items():
        value = got[CHEX.classes.index(name)]
        assert (math.isnan(want) and math.isnan(value)) or value == want, f"{name}: {value} != {want}"


def test_clauses_split_sentences_and_contrast_words_but_not_lists() -> None:
    assert clauses("No effusion, pneumothorax, or edema. Heart is large; but stable") == [
        "no effusion, pneumothorax, or edema.",
        "heart is large",
        "stable",
    ]


def test_phantom_grammar_reproduces_ground_truth() -> None:
    n_wrong = 0
    for i in range(150):
        s = phantom_cxr.generate(i, seed=3, size=32)
        n_wrong += not np.array_equal(to_binary(PHANTOM(s.report)), s.labels)
    assert n_wrong == 0


def test_phantom_vocabulary_covers_generator_phrases() -> None:
    assert PHANTOM.classes == list(phantom_cxr.FINDINGS)
    for c, name in enumerate(PHANTOM.classes):
        for phrase in phantom_cxr.SYNONYMS[name]:
            assert PHANTOM(f"There is {phrase}.")[c] == 1, phrase
        for sentence in phantom_cxr.NEGATIONS[name]:
            assert PHANTOM(sentence)[c] == 0, sentence


def test_phantom_ct_vocabulary_covers_generator_phrases() -> None:
    lab = ReportLabeler("phantom_ct")
    assert lab.classes == list(phantom_ct.FINDINGS)
    for c, name in enumerate(lab.classes):
        for phrase in phantom_ct.SYNONYMS[name]:
            assert lab(f"There is {phrase}.")[c] == 1, phrase
        for sentence in phantom_ct.NEGATIONS[name]:
            assert lab(sentence)[c] == 0, sentence


def test_phantom_ct_reports_reproduce_ground_truth() -> None:
    """Generated CT reports: every positive the report states is found, and nothing else (was: no vocabulary)."""
    lab = ReportLabeler("phantom_ct")
    samples = [phantom_ct.generate(i, seed=3, size=32) for i in range(120)]
    got = np.stack([to_binary(lab(s.report)) for s in samples])
    truth = np.stack([s.labels for s in samples])
    assert truth.sum(0).min() >= 10  # every finding occurs, so the comparison covers positives
    assert np.array_equal(got, truth)


def test_phantom_mri_reports_agree_with_ground_truth() -> None:
    """Generated MRI reports (labels: healthy / LGG / HGG): findings the grammar always states agree exactly;
    oedema is stated for every high-grade case and for some low-grade ones, and never for a healthy one."""
    lab = ReportLabeler("phantom_mri")
    samples = [phantom_mri.generate(i, seed=3, size=32) for i in range(120)]
    got = {n: np.array([to_binary(lab(s.report))[j] for s in samples]) for j, n in enumerate(lab.classes)}
    cls = np.array([int(s.labels) for s in samples])
    assert np.bincount(cls, minlength=3).min() >= 20
    truth = {
        "mass": cls > 0,
        "enhancement": cls == 2,
        "necrosis": cls == 2,
        "low_grade_glioma": cls == 1,
        "high_grade_glioma": cls == 2,
    }
    for name, want in truth.items():
        assert np.array_equal(got[name], want.astype(np.float32)), name
    edema = got["edema"] > 0
    assert edema[cls == 2].all() and not edema[cls == 0].any() and 0.2 < edema[cls == 1].mean() < 1
    assert lab("FINDINGS: A non-enhancing mass.")[lab.classes.index("enhancement")] == 0


def test_user_findings_list_is_a_vocabulary() -> None:
    lab = ReportLabeler(["Pleural Effusion", "lung_nodule"])
    assert lab.classes == ["Pleural Effusion", "lung_nodule"]
    assert lab("Small left pleural effusion. No lung nodules.").tolist() == [1, 0]
    assert lab("Possible lung-nodule.")[1] == -1 and np.isnan(lab("Normal study.")).all()
    with pytest.raises(ValueError, match="distinct"):
        ReportLabeler(["nodule", "nodule"])


def test_corpus_vocabulary_comes_from_the_dataset_declarations() -> None:
    for module in (phantom_cxr, phantom_ct, phantom_mri):
        name = module.__name__.rsplit(".", 1)[1]
        assert module.REPORT_VOCABULARY in VOCABULARIES and corpus_vocabulary(name) == module.REPORT_VOCABULARY
    assert corpus_vocabulary("mimic_cxr") == "chexpert"
    assert corpus_vocabulary("image_text_csv", ["effusion", "nodule"]) == ["effusion", "nodule"]
    with pytest.raises(ConfigError, match="'image_text_csv' has no findings list"):
        corpus_vocabulary("image_text_csv", [])
    for corpus in ("btcv", "my_corpus", "../x"):
        with pytest.raises(ConfigError, match=f"corpus '{re.escape(corpus)}' declares no report vocabulary"):
            corpus_vocabulary(corpus)
    with pytest.raises(ConfigError, match="needs the pre-training corpus"):
        corpus_vocabulary(None)


def test_to_binary_policies_and_extra_synonyms() -> None:
    raw = np.array([[1, 0, -1, np.nan]], np.float32)
    assert to_binary(raw, "ones").tolist() == [[1, 0, 1, 0]]
    assert to_binary(raw, "zeros").tolist() == [[1, 0, 0, 0]]
    assert to_binary(raw, "half", missing=-9).tolist() == [[1, 0, 0.5, -9]]
    lab = ReportLabeler("phantom_cxr", {"effusion": ["hydrothorax"]})
    assert lab("Right hydrothorax.")[lab.classes.index("effusion")] == 1
    assert lab("No hydrothorax.")[lab.classes.index("effusion")] == 0
    hyphen = ReportLabeler("phantom_mri", {"high_grade_glioma": ["grade-IV astrocytoma"]})
    assert hyphen("Grade-IV astrocytoma.")[hyphen.classes.index("high_grade_glioma")] == 1


def test_bad_configuration_names_the_problem() -> None:
    with pytest.raises(KeyError, match="chexpert"):
        ReportLabeler("mimic")
    with pytest.raises(KeyError, match="spleen"):
        ReportLabeler("phantom_cxr", {"spleen": ["splenomegaly"]})
    with pytest.raises(ValueError, match="uncertain policy"):
        to_binary(np.zeros(2), "maybe")


def _measure_module():
    return load_script("scripts/measure_labeler.py")


def test_agreement_with_iu_xray_mesh_tags() -> None:
    """Real reports (read at run time, never copied): the labeller agrees with the MeSH tags."""
    csv = shared_data() / "iu-xray-reports-textonly" / "indiana_reports.csv"
    if not csv.is_file():
        pytest.skip(f"IU X-ray reports not found at {csv}")
    table = _measure_module().measure(csv).set_index("finding")
    for name in ("cardiomegaly", "lung_opacity", "atelectasis", "pneumothorax", "pleural_effusion"):
        assert table.loc[name, "f1"] > 0.8, (name, table.loc[name].to_dict())
    assert table.drop("no_finding")["kappa"].mean() > 0.7
