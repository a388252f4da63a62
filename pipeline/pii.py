"""PII/PHI detection and redaction: Microsoft Presidio's analyzer with pattern recognizers, offline.

Presidio is imported inside ``PiiScanner`` only: its package imports transformers and torch (seconds; see
benchmarks/contracts.md), which ``validate`` pays only when a contract gives a field a PII policy.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

PII_ENTITIES = (
    "US_SSN",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "CREDIT_CARD",
    "DATE_OF_BIRTH",
    "MEDICAL_RECORD_NUMBER",
    "PERSON",
)
"""Entity types the detector knows. PERSON needs a spaCy NER model; none ships with pipeline."""

# spaCy pipelines that can find PERSON names, best first. None is installed by pipeline (a model is a
# download); when one is present in the environment, names are detected with it.
SPACY_NAME_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")

# A date as clinicians write it: 03/14/1962, 3-14-62, 1962-03-14, March 14, 1962, 14 Mar 1962.
_DATE = (
    r"(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})|\d{4}-\d{2}-\d{2}"
    r"|(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s+\d{1,2},?\s+\d{4}"
    r"|\d{1,2}\s+(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s+\d{4})"
)
# Only the value is matched (the label is a look-behind), so redaction keeps "DOB: <DATE_OF_BIRTH>" readable.
# Presidio matches with the ``regex`` module, which allows these variable-length look-behinds.
_DOB_LABEL = r"(?:DOB|D\.O\.B\.?|date\s+of\s+birth|birth\s*date|born(?:\s+on)?)"
_MRN_LABEL = r"(?:MRN|MR#|MR\s+no\.?|medical\s+record(?:\s+(?:number|no\.?|#))?|chart\s*(?:#|no\.?))"
DOB_PATTERN = r"(?<=\b" + _DOB_LABEL + r"\s{0,3}[:#]?\s{0,3})" + _DATE
MRN_PATTERN = r"(?<=\b" + _MRN_LABEL + r"\s{0,3}[:#]?\s{0,3})" r"[A-Z]{0,3}-?\d{5,12}\b"
# Every pattern entity above needs an '@' or three digits close together; text without either cannot hold
# one, and skipping the analyzer for it is what makes the scan fast on clean notes (see benchmarks/contracts.md).
_MAYBE_PII = re.compile(r"@|\d(?:\D{0,4}\d){2}")


@dataclass(frozen=True)
class PiiFinding:
    """One detected span: its entity type, character offsets and Presidio's score (never the text)."""

    entity: str
    start: int
    end: int
    score: float


def name_model() -> str | None:
    """The first installed spaCy NER pipeline that can find PERSON names, or None (checked without importing)."""
    import importlib.util

    return next((m for m in SPACY_NAME_MODELS if importlib.util.find_spec(m) is not None), None)


class PiiScanner:
    """Presidio's analyzer with pattern recognizers only: nothing is downloaded, nothing is fetched.

    * US_SSN, PHONE_NUMBER (US numbers, ``phonenumbers``), EMAIL_ADDRESS and CREDIT_CARD (Luhn-checked) are
      Presidio's own recognizers;
    * DATE_OF_BIRTH and MEDICAL_RECORD_NUMBER are pattern recognizers defined here (a date or an identifier
      right after a DOB / MRN label);
    * PERSON needs an NLP model: used when a spaCy English model is installed, otherwise reported as
      unavailable (``unavailable``), never silently claimed.

    Presidio's email recognizer validates domains with ``tldextract``, whose default extractor downloads the
    public-suffix list on first use. The scanner gives it an extractor built on the snapshot bundled with
    ``tldextract`` (``suffix_list_urls=()``, no cache directory), so it never tries the network.
    """

    def __init__(self, entities: tuple[str, ...] | list[str] = PII_ENTITIES, min_score: float = 0.4):
        from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NoOpNlpEngine
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            PhoneRecognizer,
            UsSsnRecognizer,
        )
        from tldextract import TLDExtract

        offline_tld = TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

        class OfflineEmailRecognizer(EmailRecognizer):
            def validate_result(self, pattern_text: str) -> bool:
                return offline_tld(pattern_text).fqdn != ""

        unknown = sorted(set(entities) - set(PII_ENTITIES))
        if unknown:
            raise ValueError(f"unknown PII entities {unknown}; known: {list(PII_ENTITIES)}")
        available = {
            "US_SSN": lambda: UsSsnRecognizer(),
            "PHONE_NUMBER": lambda: PhoneRecognizer(supported_regions=("US",)),
            "EMAIL_ADDRESS": lambda: OfflineEmailRecognizer(),
            "CREDIT_CARD": lambda: CreditCardRecognizer(),
            "DATE_OF_BIRTH": lambda: PatternRecognizer(
                supported_entity="DATE_OF_BIRTH", patterns=[Pattern("date after a DOB label", DOB_PATTERN, 0.85)]
            ),
            "MEDICAL_RECORD_NUMBER": lambda: PatternRecognizer(
                supported_entity="MEDICAL_RECORD_NUMBER",
                patterns=[Pattern("identifier after an MRN label", MRN_PATTERN, 0.85)],
            ),
        }
        self.min_score = min_score
        self.model = name_model() if "PERSON" in entities else None
        self.entities = [e for e in entities if e in available or (e == "PERSON" and self.model)]
        self.unavailable = {
            e: "no spaCy NER model is installed (pattern recognizers cannot find names); install one, e.g. "
            "en_core_web_lg, to detect PERSON"
            for e in entities
            if e == "PERSON" and not self.model
        }
        recognizers = [available[e]() for e in self.entities if e in available]
        if self.model:
            from presidio_analyzer.nlp_engine import NlpEngineProvider
            from presidio_analyzer.predefined_recognizers import SpacyRecognizer

            nlp_engine = NlpEngineProvider(
                nlp_configuration={
                    "nlp_engine_name": "spacy",
                    "models": [{"lang_code": "en", "model_name": self.model}],
                }
            ).create_engine()
            recognizers.append(SpacyRecognizer(supported_entities=["PERSON"]))
        else:
            nlp_engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
        self._engine = AnalyzerEngine(
            registry=RecognizerRegistry(recognizers=recognizers), nlp_engine=nlp_engine, supported_languages=["en"]
        )

        # Per entity, a necessary condition for its recognizer to find anything (see ``_gates``); None: always run.
        self._gates = _gates(recognizers) if not self.model else {}

    def scan(self, text: str, reference: bool = False) -> list[PiiFinding]:
        """Detected spans in ``text``, sorted by position, overlaps resolved (higher score, then longer wins).

        The fast path (default) asks Presidio only for the entities whose recognizer can match this text (a
        recognizer skipped returns nothing, so the findings are the same); ``reference=True`` asks for every
        entity, as before the fast path: tests/test_pii_fast.py holds the two equal.
        """
        if not self.model and not _MAYBE_PII.search(text):
            return []
        entities = self.entities
        if not reference and self._gates:
            gates = self._gates
            entities = [e for e in entities if (gate := gates.get(e)) is None or gate(text)]
            if not entities:
                return []
        results = self._engine.analyze(text, language="en", entities=entities, score_threshold=self.min_score)
        spans = sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start))
        kept: list[PiiFinding] = []
        for r in spans:
            if all(r.end <= k.start or r.start >= k.end for k in kept):
                kept.append(PiiFinding(r.entity_type, r.start, r.end, round(float(r.score), 3)))
        return sorted(kept, key=lambda f: f.start)


# The patterns each gate below was derived from: a gate is used only while the installed recognizer still has
# exactly these (a Presidio upgrade that changes them turns the gate off, never the recall).
_SSN_PATTERNS = (
    r"\b([0-9]{5})-([0-9]{4})\b",
    r"\b([0-9]{3})-([0-9]{6})\b",
    r"\b(([0-9]{3})-([0-9]{2})-([0-9]{4}))\b",
    r"\b[0-9]{9}\b",
    r"\b([0-9]{3})[- .]([0-9]{2})[- .]([0-9]{4})\b",
)
_CARD_PATTERNS = (
    r"\b(?!1\d{12}(?!\d))((4\d{3})|(5[0-5]\d{2})|(6\d{3})|(1\d{3})|(3\d{3}))"
    r"[- ]?(\d{3,4})[- ]?(\d{3,4})[- ]?(\d{3,5})\b",
)
# Each gate is a relaxation of every pattern of its recognizer (a match of a pattern contains a match of the gate),
# searched with the same module and flags: SSN patterns all hold 3 + 2 + 4 ASCII digits with optional single
# separators; the card pattern the same digit groups without its first-digit and boundary tests; e-mail an "@";
# DOB and MRN their label (the look-behind).
_GATE_REGEXES = {
    "US_SSN": (_SSN_PATTERNS, r"[0-9]{3}[- .]?[0-9]{2}[- .]?[0-9]{4}"),
    "CREDIT_CARD": (_CARD_PATTERNS, r"\d{4}[- ]?\d{3,4}[- ]?\d{3,4}[- ]?\d{3,5}"),
    "DATE_OF_BIRTH": ((DOB_PATTERN,), _DOB_LABEL),
    "MEDICAL_RECORD_NUMBER": ((MRN_PATTERN,), _MRN_LABEL),
}


def _gates(recognizers: list) -> dict:
    """Per entity, ``gate(text) -> bool``: False only when its recognizer provably finds nothing in ``text``."""
    import regex

    gates: dict = {}
    for recognizer in recognizers:
        entity = recognizer.supported_entities[0]
        patterns = tuple(p.regex for p in getattr(recognizer, "patterns", ()))
        if entity in _GATE_REGEXES and patterns == _GATE_REGEXES[entity][0]:
            flags = recognizer.global_regex_flags
            gates[entity] = regex.compile(_GATE_REGEXES[entity][1], flags=flags).search
        elif entity == "EMAIL_ADDRESS" and all("[@]" in p for p in patterns) and patterns:
            gates[entity] = lambda text: "@" in text
        elif entity == "PHONE_NUMBER" and tuple(getattr(recognizer, "supported_regions", ())) == ("US",):
            gates[entity] = _phone_gate()
    return gates


def _phone_gate():  # noqa: ANN202 - Callable[[str], bool]
    """A necessary condition for ``phonenumbers.PhoneNumberMatcher(text, "US", leniency=VALID)`` to find a number.

    A match is a substring of a match of the matcher's candidate pattern, whose characters are digits,
    phone punctuation, plus signs, brackets and the extension labels (letters a e i n o s t x, in any case, among
    ASCII letters). So a match lies inside one run of text free of the other ASCII letters and symbols below. A
    valid number has at least ``K`` digits (country code + the shortest valid national number, from the
    library's metadata; without a plus sign: the shortest NANPA number or the US exit code 011 + the shortest
    international one). Letters count as digits only where a run has 3 letters (the parser's vanity-number
    rule ``(?:.*?[A-Za-z]){3}`` is what maps letters to digits); non-ASCII characters never break a run.
    """
    from phonenumbers import PhoneMetadata
    from phonenumbers.phonenumberutil import _MIN_LENGTH_FOR_NSN, COUNTRY_CODE_TO_REGION_CODE

    descs = ("general_desc", "fixed_line", "mobile", "toll_free", "premium_rate", "shared_cost", "personal_number",
             "voip", "pager", "uan", "voicemail", "no_international_dialling")  # fmt: skip
    shortest: dict[int, int] = {}
    for code, regions in COUNTRY_CODE_TO_REGION_CODE.items():
        for region in regions:
            meta = (
                PhoneMetadata.metadata_for_nongeo_region(code)
                if region == "001"
                else PhoneMetadata.metadata_for_region(region)
            )
            lengths = [_MIN_LENGTH_FOR_NSN]  # a region without metadata: the parser's own floor
            if meta is not None:
                lengths = []
                for name in descs:
                    desc = getattr(meta, name, None)
                    if desc is not None:
                        possible = [n for n in (desc.possible_length or ()) if n > 0]
                        lengths.append(min(possible) if possible else _MIN_LENGTH_FOR_NSN)
            shortest[code] = min(shortest.get(code, 99), min(lengths or [_MIN_LENGTH_FOR_NSN]))
    international = min(len(str(code)) + n for code, n in shortest.items())
    exit_code = PhoneMetadata.metadata_for_region("US").international_prefix
    exit_digits = len(exit_code) if exit_code and exit_code.isdigit() else 1
    without_plus = min(shortest.get(1, _MIN_LENGTH_FOR_NSN) + 0, exit_digits + international)
    breaks = re.compile(r"[b-dfghj-mpqruvwyzB-DFGHJ-MPQRUVWYZ!\"$%&'*<>?@^_`{|}\\]+")

    def gate(text: str) -> bool:
        need = international if ("+" in text or "\uff0b" in text) else without_plus
        for run in breaks.split(text):
            if len(run) < need:
                continue
            letters = sum(map(str.isalpha, run))
            count = sum(map(str.isalnum, run)) if letters >= 3 else sum(map(str.isnumeric, run))
            if count >= need:
                return True
        return False

    return gate


@functools.cache
def pii_scanner(entities: tuple[str, ...] = PII_ENTITIES, min_score: float = 0.4) -> PiiScanner:
    """One scanner per configuration and process (building Presidio's recognizers takes a moment)."""
    return PiiScanner(entities, min_score)


def redact(text: str, findings: list[PiiFinding]) -> str:
    """Replace each finding with a typed placeholder: ``SSN 536-22-8726`` -> ``SSN <US_SSN>``."""
    parts, last = [], 0
    for f in sorted(findings, key=lambda f: f.start):
        parts += [text[last : f.start], f"<{f.entity}>"]
        last = f.end
    parts.append(text[last:])
    return "".join(parts)
