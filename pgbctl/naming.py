"""Every resource name of a broker instance, and the inverses that parse them back.

Pure: no I/O, no clients. One broker instance is ``(survey, testid)`` inside a GCP project;
``testid=None`` is production (names carry no suffix).

Conventions (one per GCP resource kind, because GCP allows different characters per kind):

=================  ===========================================  ===============================
kind               format                                       example (testid ``x``)
=================  ===========================================  ===============================
topic              ``<survey>-<stub>[-<testid>]``               ``ztf-alerts-x``
subscription       ``<survey>-<stub>[-<testid>]``               ``ztf-alerts-counter-x``
bucket             ``<project>-<survey>-<stub>[-<testid>]``     ``my-proj-ztf-alert_avros-x``
dataset            ``<survey>_<stub>[_<testid>]`` (BigQuery)     ``ztf_alerts_x``
table              ``<stub>`` inside the dataset                ``DIASource``
vm                 ``<survey>-<stub>[-<testid>]`` (no ``_``)      ``ztf-night-conductor-x``
function           ``<survey>-<stub>[-<testid>]``               ``ztf-upload_bytes_to_bucket-x``
beam_job           ``<survey>-<stub>[-<testid>]`` (no ``_``)      ``ztf-bq-sink-x``
scheduler_job      ``<survey>-<stub>[-<testid>]``               ``ztf-cue-night-conductor-start-x``
=================  ===========================================  ===============================

Parsing is kind-aware: a name is split against the known stubs of its kind, so
``ztf-alerts-counter`` (production subscription) is never read as stub ``alerts`` with
testid ``counter``. :func:`check_unambiguous` proves that for the stub registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "NameError_",
    "Kind",
    "Instance",
    "STUBS",
    "TOPICS",
    "DATA_TOPICS",
    "SUBSCRIPTIONS",
    "BUCKETS",
    "TABLES",
    "fmt",
    "parse",
    "validate_testid",
    "validate_survey",
    "validate_project",
    "check_unambiguous",
]


class NameError_(ValueError):
    """A name or a name part is invalid; the message says which rule it breaks."""


class Kind(str, Enum):
    topic = "topic"
    subscription = "subscription"
    bucket = "bucket"
    dataset = "dataset"
    table = "table"
    vm = "vm"
    function = "function"
    beam_job = "beam_job"
    scheduler_job = "scheduler_job"


# ---- the stub registry: what one instance consists of --------------------------------------
DATA_TOPICS: tuple[str, ...] = ("alerts", "alert_avros", "alerts_pure", "exgalac_trans", "salt2")
TOPICS: tuple[str, ...] = DATA_TOPICS + ("cue_night_conductor", "dead_letter")
# subscription stub -> the topic stub it is attached to
SUBSCRIPTION_TOPIC: dict[str, str] = {
    **{f"{t}-counter": t for t in DATA_TOPICS},
    "dead_letter-counter": "dead_letter",
    "alerts-reservoir": "alerts",
    # the trigger/input subscriptions of the components that read `alerts`, created up front so
    # that nothing published before a component starts is missed
    "alerts-upload_bytes_to_bucket": "alerts",
    "alerts-bq-sink": "alerts",
    "alerts-value-added": "alerts",
}
SUBSCRIPTIONS: tuple[str, ...] = tuple(SUBSCRIPTION_TOPIC)
BUCKETS: tuple[str, ...] = ("broker_files", "alert_avros", "sncosmo", "dataflow", "dead_letter")
DATASETS: tuple[str, ...] = ("alerts",)
TABLES: tuple[str, ...] = ("alerts", "DIASource", "salt2")
VMS: tuple[str, ...] = ("consumer", "night-conductor")
FUNCTIONS: tuple[str, ...] = ("upload_bytes_to_bucket", "cue_night_conductor", "check_cue_response")
BEAM_JOBS: tuple[str, ...] = ("bq-sink", "value-added")
SCHEDULER_JOBS: tuple[str, ...] = ("cue-night-conductor-start", "cue-night-conductor-end")

STUBS: dict[Kind, tuple[str, ...]] = {
    Kind.topic: TOPICS,
    Kind.subscription: SUBSCRIPTIONS,
    Kind.bucket: BUCKETS,
    Kind.dataset: DATASETS,
    Kind.table: TABLES,
    Kind.vm: VMS,
    Kind.function: FUNCTIONS,
    Kind.beam_job: BEAM_JOBS,
    Kind.scheduler_job: SCHEDULER_JOBS,
}

_SEP = {Kind.dataset: "_"}  # BigQuery forbids '-'; everything else uses '-'

# ---- rules for the parts ---------------------------------------------------------------------
_WORD = re.compile(r"^[a-z][a-z0-9]*$")
# Words that were, or look like, a boolean or a null sneaking in as a string (the system we
# re-create used testid "False" to mean production).
_RESERVED_TESTIDS = frozenset({"false", "true", "none", "null", "nil", "prod", "production"})
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_MAX_LEN = {
    Kind.topic: 255,
    Kind.subscription: 255,
    Kind.bucket: 63,
    Kind.dataset: 1024,
    Kind.table: 1024,
    Kind.vm: 63,
    Kind.function: 63,
    Kind.beam_job: 1024,
    Kind.scheduler_job: 500,
}


def validate_testid(testid: str | None) -> str | None:
    """Return the canonical testid (``None`` = production) or raise :class:`NameError_`.

    A testid is lowercase letters and digits, starting with a letter (no ``-``: it is a name
    separator; no ``_``: BigQuery names join with it). ``""`` and ``None`` mean production.
    Booleans and their string forms are refused: "False" must never mean production again.
    """
    if testid is None or testid == "":
        return None
    if isinstance(testid, bool) or not isinstance(testid, str):
        raise NameError_(f"testid must be a string or omitted, got {testid!r}")
    if testid.lower() in _RESERVED_TESTIDS:
        raise NameError_(
            f"testid {testid!r} is reserved (it reads as a boolean/null); omit --testid for "
            "production or choose another word"
        )
    if not _WORD.match(testid):
        raise NameError_(
            f"invalid testid {testid!r}: use lowercase letters and digits, starting with a letter "
            "(no '-', no '_')"
        )
    if len(testid) > 20:
        raise NameError_(f"testid {testid!r} is longer than 20 characters")
    return testid


def validate_survey(survey: str) -> str:
    if not isinstance(survey, str) or not _WORD.match(survey) or len(survey) > 12:
        raise NameError_(
            f"invalid survey {survey!r}: use up to 12 lowercase letters and digits, starting "
            "with a letter"
        )
    return survey


def validate_project(project: str) -> str:
    if not isinstance(project, str) or not _PROJECT.match(project) or "--" in project:
        raise NameError_(
            f"invalid project id {project!r}: 6-30 characters, lowercase letters, digits and "
            "'-', starting with a letter, not ending with '-'"
        )
    return project


@dataclass(frozen=True, order=True)
class Instance:
    """One broker instance: a survey and a testid (``None`` = production) in a project."""

    survey: str
    testid: str | None = None
    project: str = "pgbctl-local"

    def __post_init__(self) -> None:
        validate_survey(self.survey)
        object.__setattr__(self, "testid", validate_testid(self.testid))
        validate_project(self.project)

    @property
    def production(self) -> bool:
        return self.testid is None

    @property
    def label(self) -> str:
        return f"{self.survey}/{self.testid or '(production)'}"

    def name(self, kind: Kind | str, stub: str) -> str:
        return fmt(Kind(kind), stub, self)

    # convenience accessors used all over the code base
    def topic(self, stub: str) -> str:
        return fmt(Kind.topic, stub, self)

    def subscription(self, stub: str) -> str:
        return fmt(Kind.subscription, stub, self)

    def bucket(self, stub: str) -> str:
        return fmt(Kind.bucket, stub, self)

    @property
    def dataset(self) -> str:
        return fmt(Kind.dataset, "alerts", self)

    def table(self, stub: str) -> str:
        """Fully qualified ``project.dataset.table``."""
        return f"{self.project}.{self.dataset}.{fmt(Kind.table, stub, self)}"

    def vm(self, stub: str) -> str:
        return fmt(Kind.vm, stub, self)

    def function(self, stub: str) -> str:
        return fmt(Kind.function, stub, self)

    def beam_job(self, stub: str) -> str:
        return fmt(Kind.beam_job, stub, self)

    def scheduler_job(self, stub: str) -> str:
        return fmt(Kind.scheduler_job, stub, self)


def fmt(kind: Kind, stub: str, inst: Instance) -> str:
    """The name of resource ``stub`` of kind ``kind`` for ``inst``."""
    kind = Kind(kind)
    if stub not in STUBS[kind]:
        raise NameError_(f"unknown {kind.value} stub {stub!r}; known: {', '.join(STUBS[kind])}")
    if kind is Kind.table:
        return stub
    sep = _SEP.get(kind, "-")
    parts = [inst.survey, stub] + ([inst.testid] if inst.testid else [])
    name = sep.join(parts)
    if kind is Kind.bucket:
        name = f"{inst.project}-{name}"
    if len(name) > _MAX_LEN[kind]:
        raise NameError_(
            f"{kind.value} name {name!r} is {len(name)} characters; GCP allows {_MAX_LEN[kind]}. "
            "Use a shorter testid (or project id)."
        )
    return name


def parse(kind: Kind | str, name: str, project: str | None = None) -> tuple[str, Instance]:
    """Inverse of :func:`fmt`: ``(stub, Instance)`` for a resource name.

    ``project`` is needed for buckets (their names start with it) and is used as the
    Instance's project otherwise (default ``pgbctl-local``). Raises :class:`NameError_` if the
    name is not one of ours.
    """
    kind = Kind(kind)
    proj = project or "pgbctl-local"
    if kind is Kind.table:
        if name not in STUBS[kind]:
            raise NameError_(f"{name!r} is not a pgbctl table")
        raise NameError_("a table name alone does not identify an instance; parse its dataset")
    rest = name
    if kind is Kind.bucket:
        if project is None:
            raise NameError_("parsing a bucket name needs the project id")
        prefix = f"{project}-"
        if not name.startswith(prefix):
            raise NameError_(f"bucket {name!r} does not start with project id {project!r}")
        rest = name[len(prefix) :]
    sep = _SEP.get(kind, "-")
    survey, _, tail = rest.partition(sep)
    if not tail:
        raise NameError_(f"{name!r} is not a pgbctl {kind.value} name")
    # longest stub first, so a stub that extends another wins
    for stub in sorted(STUBS[kind], key=len, reverse=True):
        if tail == stub:
            return stub, Instance(survey, None, proj)
        if tail.startswith(stub + sep):
            testid = tail[len(stub) + len(sep) :]
            try:
                return stub, Instance(survey, testid, proj)
            except NameError_:
                continue
    raise NameError_(f"{name!r} is not a pgbctl {kind.value} name")


def check_unambiguous() -> list[str]:
    """Problems in the stub registry: a stub that equals another stub + separator + a word
    that could be a testid would make parsing ambiguous. Returns [] when all is well."""
    problems = []
    for kind, stubs in STUBS.items():
        sep = _SEP.get(kind, "-")
        for a in stubs:
            for b in stubs:
                if a != b and a.startswith(b + sep):
                    word = a[len(b) + len(sep) :]
                    try:
                        validate_testid(word)
                    except NameError_:
                        continue
                    problems.append(f"{kind.value}: {a!r} = {b!r} + testid {word!r}")
    return problems
