"""Rule-based report labeller: observations with negation and uncertainty, CheXpert conventions.

Why rules: pre-training methods that contrast image-label pairs (UMCL, MedCLIP) need labels for report
corpora, and in the real setting those come from a labeller too (MIMIC-CXR's CheXpert labels). Reading a
dataset's ground-truth labels in pre-training would leak them into label-fraction evaluations.

Per observation the result is ``1`` (positive), ``0`` (negated or stated normal), ``-1`` (uncertain) or
``nan`` (not mentioned). Each mention is classified in its clause (sentence split at ``. ! ?``, clause split
at ``; :``, *but*, *however*, ``, there is`` ...), following NegEx/CheXpert:

1. an uncertainty phrase built on a negation ("cannot be excluded", "not ruled out") before or after the
   mention -> uncertain (checked first, so its *not* is not read as a negation);
2. a negation cue (*no*, *not*, *without*, *negative for*, *free of*, *resolved* ...) between the clause start
   and the mention's end (so lists such as "no effusion, consolidation, or pneumothorax" are all negated),
   with pseudo-negations ("no change in", "no increase") ignored -> negative;
3. a post-negation ("... is not seen", "has resolved", "no longer") after the mention, before the next
   comma -> negative;
4. an uncertainty cue (*may*, *possible*, *likely*, *suspicious for*, *borderline* ...) before the mention,
   "X or Y" / "X versus Y" next to it, or "... is suspected/may be" after it -> uncertain; else positive.

Normal phrases ("heart size is normal", "the lungs are clear") give 0 and uncertain phrases ("heart size at
the upper limits of normal") give -1 without a mention. Mentions aggregate as CheXpert does: any positive
-> 1, else any uncertain -> -1, else any negative -> 0, else nan. ``no_finding`` (when in the vocabulary) is
1 when no other observation except support devices is positive or uncertain, else 0.

Vocabularies: one per phantom report grammar (``phantom_cxr``, ``phantom_ct``, ``phantom_mri``), ``chexpert`` for
real chest X-ray reports, or a user's list of finding names. A corpus declares its vocabulary as
``REPORT_VOCABULARY`` in its dataset module; :func:`corpus_vocabulary` reads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
NOT_MENTIONED = float("nan")

_NEG_PRE = re.compile(
    r"\b(?:no|not|without|negative for|free of|absence of|resolution of|resolved|clear of|neither|nor|never"
    r"|rather than|ruled out|removal of|removed)\b"
)
_NEG_POST = re.compile(
    r"\b(?:not (?:seen|identified|present|visuali[sz]ed|evident|appreciated|demonstrated|noted|detected|apparent)"
    r"|absent|resolved|no longer|cleared|(?:is|are|was|were) negative|removed)\b"
)
_UNC_NEG = re.compile(
    r"\b(?:cannot|can not|can't|could not|not)\s+(?:be\s+)?(?:entirely\s+|completely\s+|totally\s+)?"
    r"(?:exclude[ds]?|rule[ds]? out)\b"
)
_UNC_PRE = re.compile(
    r"\b(?:may|might|could|possibl[ey]|probabl[ey]|likely|questionabl[ey]|question of|suspect\w*|suspicious"
    r"|suspicion|suggest\w*|concern(?:ing)? for|worrisome|differential|equivocal|indeterminate|borderline"
    r"|consider\w*|presum\w*|vs|versus|rule out|r/o|(?:difficult|hard) to exclude)\b|\?"
)
_UNC_OR_BEFORE = re.compile(r"\b(?:or|versus|vs)\s+(?:[\w/]+\s+){0,3}$")
_UNC_OR_AFTER = re.compile(r"^[\s,]*(?:[\w/]+\s+)?(?:or|versus|vs)\b")
_UNC_POST = re.compile(
    r"\b(?:may|might|could|suspected|questioned)\b|\b(?:is|are|was|were|appears?|seems?)\s+"
    r"(?:likely|possible|probable|suspected|questioned|equivocal|suggested)\b|\?"
)
_PSEUDO_NEG = re.compile(
    r"\b(?:no|without)\s+(?:significant\s+|interval\s+|appreciable\s+|definite\s+)?"
    r"(?:change|increase|decrease|worsening|progression|improvement|difficulty)\b|\bnot only\b|\bnot changed\b"
    r"|\bgram negative\b"
)
_HYPHEN = re.compile(r"(?<=[a-z])-(?=[a-z])")  # "non-enhancing" reads as "non enhancing"
_SENTENCE = re.compile(r"(?<=[.!?])\s+|(?<=[a-z]\.)(?=[a-z])|\n+")
_CLAUSE = re.compile(
    r"[;:]|\b(?:but|however|although|though|except|whereas|aside from|apart from|which|yet|otherwise)\b"
    r"|,\s*(?=(?:there|this|these|it|with the exception)\b)"
)


@dataclass(frozen=True)
class Observation:
    """One label: regexes (lower case, no anchors) for mentions, normal phrases and uncertain phrases."""

    name: str
    mentions: str
    normal: str | None = None
    uncertain: str | None = None
    prompt: str | None = None  # text a prompt learner uses for the class; None: the name with spaces

    @property
    def prompt_text(self) -> str:
        return self.prompt or self.name.replace("_", " ")


def _normal(anchor: str, words: str = r"normal|unremarkable|within normal limits") -> str:
    """Anchor and a normality word in either order, within one clause and without a comma between."""
    return rf"\b(?:{anchor})\b[^,]*\b(?:{words})\b|\b(?:{words})\b[^,]*\b(?:{anchor})\b"


_LUNGS_CLEAR = r"\blungs? (?:are |is )?(?:\w+ )?(?:clear|normal)\b|\bclear lungs\b"
_HEART_NORMAL = _normal(r"heart|cardiac")

#: the phantom CXR report grammar (datasets/phantom_cxr.py: SYNONYMS, NEGATIONS); tests check it covers them
PHANTOM_CXR: tuple[Observation, ...] = (
    Observation(
        "consolidation",
        r"consolidations?|airspace opacit(?:y|ies)|airspace disease|focal opacit(?:y|ies)",
        _LUNGS_CLEAR,
    ),
    Observation("effusion", r"pleural effusions?|pleural fluid|effusions?", _LUNGS_CLEAR, prompt="pleural effusion"),
    Observation(
        "cardiomegaly",
        r"cardiomegaly|heart is (?:\w+ )?enlarged|enlarged cardiac silhouette|cardiac silhouette is (?:\w+ )?enlarged",
        _HEART_NORMAL,
    ),
    Observation("nodule", r"(?:pulmonary )?nodules?|nodular opacit(?:y|ies)", _LUNGS_CLEAR, prompt="pulmonary nodule"),
    Observation("pneumothorax", r"pneumothora(?:x|ces)", _LUNGS_CLEAR),
)

#: the phantom abdominal CT report grammar (datasets/phantom_ct.py: FINDINGS, SYNONYMS, NEGATIONS, _report)
PHANTOM_CT: tuple[Observation, ...] = (
    Observation("liver_lesion", r"(?:hepatic|liver) (?:lesions?|hypodensit(?:y|ies)|cysts?|mass(?:es)?)"),
    Observation("kidney_lesion", r"(?:renal|kidney) (?:lesions?|cysts?|mass(?:es)?)"),
    Observation("splenomegaly", r"splenomegaly|spleen is (?:\w+ )?enlarged|enlarged spleen", _normal("spleen")),
    Observation("ascites", r"ascites|free fluid|peritoneal fluid"),
)

#: the phantom brain MRI report grammar (datasets/phantom_mri.py: SYNONYMS, _report). Its corpus labels are one
#: class per case (healthy / LGG / HGG); the reports name the findings below, "non-enhancing" is a negative.
PHANTOM_MRI: tuple[Observation, ...] = (
    Observation(
        "mass",
        r"mass(?:es)?|tumou?rs?|gliomas?|neoplasms?|lesions?",
        prompt="intracranial mass",
    ),
    Observation(
        "enhancement", r"(?<!non )(?:enhancement|enhancing)", r"\bnon enhancing\b", prompt="contrast enhancement"
    ),
    Observation("necrosis", r"necros[ie]s|necrotic"),
    Observation("edema", r"o?edema|(?:t2/)?flair hyperintens(?:e|ity)|(?:abnormal )?t2/flair signal"),
    Observation("low_grade_glioma", r"low grade (?:gliomas?|glial neoplasms?)", prompt="low-grade glioma"),
    Observation("high_grade_glioma", r"high grade (?:gliomas?|glial neoplasms?)", prompt="high-grade glioma"),
)

#: the 14 CheXpert observations with common chest X-ray phrasings (after the CheXpert labeller's lists)
CHEXPERT: tuple[Observation, ...] = (
    Observation("no_finding", r"(?!x)x"),  # derived from the others, never mentioned
    Observation(
        "enlarged_cardiomediastinum",
        r"(?:cardio)?mediastin\w*(?: silhouette| contours?)? (?:is |are |appears? |remains? )?(?:\w+ )?"
        r"(?:enlarged|widened|wide|prominent)|widen\w* (?:of )?(?:the )?(?:superior )?mediastin\w*"
        r"|(?:enlarged|widened|prominent) (?:cardio)?mediastin\w*",
        _normal(r"(?:cardio)?mediastin\w*"),
    ),
    Observation(
        "cardiomegaly",
        r"cardiomegaly|(?:heart|cardiac silhouette|cardiac shadow|cardiac contour|heart size|cardiac size|cardiac)"
        r" (?:is |are |appears? |remains? )?(?:\w+ )?(?:enlarged|enlargement|large|increased)"
        r"|enlarge(?:d|ment of)(?: the)? (?:heart|cardiac)",
        _HEART_NORMAL,
        r"\b(?:heart|cardiac)\b[^,]*\b(?:upper limits? of normal|top normal|high normal|borderline)\b",
    ),
    Observation(
        "lung_opacity",
        r"opacit(?:y|ies)|opacification|air ?space (?:disease|opacit\w*)|infiltrat\w*"
        r"|(?<!bone )(?<!bony )densit(?:y|ies)"
        r"|interstitial (?:markings?|pattern|opacit\w*|prominence|thickening|disease)|reticula\w*|haziness",
        _LUNGS_CLEAR,
    ),
    Observation(
        "lung_lesion", r"nodul\w*|mass(?:es)?|lesions?|tumou?rs?|neoplasm\w*|carcinoma|cancer|malignan\w*|metasta\w*"
    ),
    Observation(
        "edema",
        r"o?edema|(?:heart|cardiac) failure|chf|(?:vascular|venous|pulmonary) congestion|congestive"
        r"|vascular (?:prominence|engorgement|redistribution)|cephalization|kerley",
        _LUNGS_CLEAR + "|" + _normal(r"vascularity|vasculature"),
    ),
    Observation("consolidation", r"consolidat\w*", _LUNGS_CLEAR),
    Observation(
        "pneumonia", r"(?:broncho)?pneumonias?|pneumonitis|(?<!granulomatous )(?:infections?|infectious)", _LUNGS_CLEAR
    ),
    Observation("atelectasis", r"atelecta\w*|(?<!vertebral )(?<!body )collapse|volume loss"),
    Observation("pneumothorax", r"(?:hydro)?pneumothora(?:x|ces)"),
    Observation(
        "pleural_effusion",
        r"(?<!pericardial )effusions?|pleural fluid|hydrothorax",
        r"\bcostophrenic (?:angles?|sulci|recess\w*) (?:are |is )?(?:\w+ )?(?:sharp|clear)\b",
    ),
    Observation(
        "pleural_other",
        r"pleural (?:thickening|plaques?|scar\w*|calcifications?|reaction)|fibrothorax"
        r"|(?:apical|biapical) (?:pleural )?(?:thickening|capping)|thickening of the pleura",
    ),
    Observation("fracture", r"fractur\w*|fx"),
    Observation(
        "support_devices",
        r"catheters?|picc|tubes?|pacemakers?|pacer|aicd|icd|defibrillators?|stimulators?"
        r"|(?:pacer |pacemaker |cardiac |monitor |ecg |ekg )leads?"
        r"|(?:sternotomy |sternal |surgical |cerclage )wires?|clips?|stents?|port ?a ?cath|(?:chest |venous )port"
        r"|valve (?:replacement|prosthes\w*)|prosthe\w*|hardware|devices?|coils?|drains?"
        r"|(?:central|picc|venous|midline|swan ganz) lines?",
    ),
)

VOCABULARIES: dict[str, tuple[Observation, ...]] = {
    "phantom_cxr": PHANTOM_CXR,
    "phantom_ct": PHANTOM_CT,
    "phantom_mri": PHANTOM_MRI,
    "chexpert": CHEXPERT,
}
#: classes computed from the others, never mentioned (no prompt of their own)
DERIVED = ("no_finding",)


def findings_vocabulary(names: Sequence[str]) -> tuple[Observation, ...]:
    """A user's own findings list as a vocabulary: each name (``_`` and ``-`` read as spaces, any case, an
    optional plural ``s``) is its own mention, with the rules' negation and uncertainty handling."""
    names = [str(n) for n in names]
    if not names or any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise ValueError(f"a findings vocabulary needs distinct, non-empty names, got {names}")
    out = []
    for n in names:
        words = re.split(r"[\s_-]+", n.strip().lower())
        out.append(Observation(n, r"\s+".join(map(re.escape, words)) + "s?", prompt=" ".join(words)))
    return tuple(out)


def resolve_vocabulary(vocabulary: str | Sequence[str] | Sequence[Observation]) -> tuple[Observation, ...]:
    """Observations of a preset name (see ``VOCABULARIES``), a list of finding names or of observations."""
    if isinstance(vocabulary, str):
        if vocabulary not in VOCABULARIES:
            raise KeyError(
                f"unknown labeller vocabulary {vocabulary!r}; choose one of {sorted(VOCABULARIES)} "
                "or give a list of finding names"
            )
        return VOCABULARIES[vocabulary]
    items = list(vocabulary)
    if items and all(isinstance(o, Observation) for o in items):
        return tuple(items)
    return findings_vocabulary(items)


def corpus_vocabulary(corpus: str | None, findings: Sequence[str] | None = None) -> str | list[str]:
    """The report vocabulary a pre-training corpus declares (``REPORT_VOCABULARY`` in its
    ``medvlp_bench.datasets.<corpus>`` module): a preset name, or, where the module declares None (a user's
    own corpus such as ``image_text_csv``), the corpus's ``findings`` (its label column names).

    Raises ``ConfigError`` naming the corpus when it declares nothing usable, so a method whose labels come
    from reports stops at build time instead of training on all-zero labels.
    """
    import importlib

    from medvlp_bench.config import ConfigError

    fix = f"set method.model.vocabulary to one of {sorted(VOCABULARIES)} or a list of finding names"
    if not corpus:
        raise ConfigError(f"vocabulary=auto needs the pre-training corpus, and none is known; {fix}")
    declared: object = "undeclared"
    if re.fullmatch(r"[a-z][a-z0-9_]*", str(corpus)):
        try:
            module = importlib.import_module(f"medvlp_bench.datasets.{corpus}")
        except ModuleNotFoundError:
            module = None
        declared = getattr(module, "REPORT_VOCABULARY", "undeclared")
    if declared is None:
        if findings:
            return [str(f) for f in findings]
        raise ConfigError(f"corpus {corpus!r} has no findings list (its label_cols are empty); {fix}")
    if declared == "undeclared" or declared not in VOCABULARIES:
        raise ConfigError(f"corpus {corpus!r} declares no report vocabulary (REPORT_VOCABULARY); {fix}")
    return str(declared)


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"\b(?:{pattern})\b")


class ReportLabeler:
    """Label reports against a vocabulary (a preset name or observations), optionally with extra synonyms.

    Args:
        vocabulary: a preset (``phantom_cxr``, ``phantom_ct``, ``phantom_mri``, ``chexpert``), a list of finding
            names (:func:`findings_vocabulary`) or a sequence of :class:`Observation`.
        extra_synonyms: class -> literal phrases added to its mentions (e.g. from a method's yaml); a plural
            ``s`` is accepted after each.
    """

    def __init__(
        self,
        vocabulary: str | Sequence[str] | Sequence[Observation] = "chexpert",
        extra_synonyms: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.observations = list(resolve_vocabulary(vocabulary))
        self.classes = [o.name for o in self.observations]
        extra = {k: [str(s) for s in v] for k, v in (extra_synonyms or {}).items()}
        unknown = sorted(set(extra) - set(self.classes))
        if unknown:
            raise KeyError(f"extra synonyms for unknown classes {unknown}; the vocabulary has {self.classes}")
        self._mention = []
        for o in self.observations:
            lit = [re.escape(_HYPHEN.sub(" ", s.lower())) + "s?" for s in extra.get(o.name, [])]
            self._mention.append(_compile("|".join([o.mentions, *lit])))
        self._normal = [re.compile(o.normal) if o.normal else None for o in self.observations]
        self._uncertain = [re.compile(o.uncertain) if o.uncertain else None for o in self.observations]
        self._derived = "no_finding" in self.classes

    def __call__(self, text: str) -> np.ndarray:
        """[C] float32 with 1 / 0 / -1 / nan per class, in ``self.classes`` order."""
        states: list[set[float]] = [set() for _ in self.classes]
        for clause in clauses(text):
            for c, states_c in enumerate(states):
                for m in self._mention[c].finditer(clause):
                    states_c.add(classify(clause, m.start(), m.end()))
                if self._uncertain[c] is not None and self._uncertain[c].search(clause):
                    states_c.add(UNCERTAIN)
                elif self._normal[c] is not None and self._normal[c].search(clause):
                    states_c.add(NEGATIVE)
        out = np.array([_aggregate(s) for s in states], dtype=np.float32)
        if self._derived:
            i = self.classes.index("no_finding")
            others = [j for j, n in enumerate(self.classes) if n not in ("no_finding", "support_devices")]
            out[i] = 0.0 if np.any(np.isin(out[others], (POSITIVE, UNCERTAIN))) else 1.0
        return out

    def label_many(self, texts: Iterable[str]) -> np.ndarray:
        """[N, C] labels of many reports."""
        rows = [self(t) for t in texts]
        return np.stack(rows) if rows else np.zeros((0, len(self.classes)), np.float32)


def clauses(text: str) -> list[str]:
    """Lower-cased clauses of a report (sentences split at . ! ? and newlines, then at clause breaks)."""
    text = _HYPHEN.sub(" ", str(text).lower())
    out = []
    for sentence in _SENTENCE.split(text):
        out.extend(c.strip() for c in _CLAUSE.split(sentence) if c and c.strip())
    return out


def classify(clause: str, start: int, end: int) -> float:
    """State of the mention ``clause[start:end]`` from the cues around it (see the module docstring)."""
    masked = _PSEUDO_NEG.sub(lambda m: "_" * len(m.group()), clause)
    pre, post = masked[:end], masked[end:].split(",")[0]
    if _UNC_NEG.search(pre):
        return UNCERTAIN
    if _NEG_PRE.search(pre):
        return NEGATIVE
    if _UNC_NEG.search(post):
        return UNCERTAIN
    if _NEG_POST.search(post):
        return NEGATIVE
    if _UNC_PRE.search(masked[:start]) or _UNC_OR_BEFORE.search(masked[:start]) or _UNC_OR_AFTER.search(post):
        return UNCERTAIN
    if _UNC_POST.search(post):
        return UNCERTAIN
    return POSITIVE


def _aggregate(states: set[float]) -> float:
    for s in (POSITIVE, UNCERTAIN, NEGATIVE):
        if s in states:
            return s
    return NOT_MENTIONED


def to_binary(labels: np.ndarray, uncertain: str = "ones", missing: float = 0.0) -> np.ndarray:
    """Training targets from labeller output: uncertain -> 1 (``ones``), 0 (``zeros``) or 0.5 (``half``);
    not mentioned -> ``missing`` (0: unmentioned findings are taken as absent, as MedCLIP does)."""
    values = {"ones": 1.0, "zeros": 0.0, "half": 0.5}
    if uncertain not in values:
        raise ValueError(f"uncertain policy must be one of {sorted(values)}, got {uncertain!r}")
    out = np.array(labels, dtype=np.float32, copy=True)
    out[np.isnan(out)] = missing
    out[out == UNCERTAIN] = values[uncertain]
    return out
