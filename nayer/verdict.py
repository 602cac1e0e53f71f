"""Was the run healthy? A verdict a person reads in five seconds, from the run folder's metrics.jsonl and summary.

    verdict = judge(records, summary)   # records: metrics.jsonl rounds; summary: summary.json (or {})
    verdict.line                        # one line, for the console and summary.json
    verdict.markdown()                  # the report's opening section

It states the student against the teacher and how the teacher rates the synthetic images, and it flags what looks
unhealthy. Each check names its threshold (THRESHOLDS), so a reader can judge the judge:
- teacher agreement: the share of the last 3 rounds' kept images the teacher assigns to their target class is
  under 50% (the images do not show the classes they were made for: see synthesis.bn_loss in the README);
- student near chance: after 2 KD rounds, the student's top-1 is under chance + 10% of the teacher's margin
  over chance (2x chance without a teacher accuracy), i.e. it does not learn from the buffer;
- non-finite steps: any generator or KD step skipped for a non-finite loss (on_nonfinite=skip);
- excluded shards: any buffer shard dropped for failing its checksum (cluster.on_corrupt_shard=exclude);
- slow round: a round over 3x the median round of its phase (3 rounds of the phase at least; a round marked
  `trainer_start`, whose time includes the student side's start-up, is not compared: the pipeline's round that
  starts the DeepSpeed ranks, nayer.run's first KD round of each start).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from nayer.losses import RELATIVE_A_BN_PER_A_CLS


@dataclass(frozen=True)
class Thresholds:
    min_agreement: float = 50.0  # % of kept images the teacher assigns to their target class
    rating_rounds: int = 3  # the teacher's rating: the mean over the last 3 rounds' kept images
    learning_rounds: int = 2  # KD rounds before the student is expected above chance
    chance_margin: float = 0.1  # the student must be this share of the way from chance to the teacher
    slow_round: float = 3.0  # a round this many times its phase's median round time is flagged
    min_rounds_for_median: int = 3


THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not measured in this run
    detail: str  # what was seen, with the threshold


@dataclass(frozen=True)
class Verdict:
    checks: tuple[Check, ...]
    facts: tuple[str, ...]  # what a reader wants first: accuracy, the teacher's rating, where the time went

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def healthy(self) -> bool:
        return not self.warnings

    @property
    def line(self) -> str:
        head = "healthy" if self.healthy else f"{len(self.warnings)} warning{'s' if len(self.warnings) > 1 else ''}"
        warned = {w.name for w in self.warnings}
        # the warnings, then the accuracy and the teacher's rating, unless a warning already says them
        facts = [fact for fact, check in zip(self.facts, ("student learns", "teacher agreement")) if check not in warned]
        return f"verdict: {head}: " + "; ".join([w.detail for w in self.warnings] + facts)

    def markdown(self) -> list[str]:
        mark = {True: "ok", False: "**WARNING**", None: "not measured"}
        lines = [f"## Verdict: {'healthy' if self.healthy else 'unhealthy, ' + str(len(self.warnings)) + ' warning(s)'}",
                 "", *[f"- {fact}" for fact in self.facts], "", "| check | result | what was seen (threshold) |",
                 "|---|---|---|"]
        lines += [f"| {c.name} | {mark[c.ok]} | {c.detail} |" for c in self.checks]
        return lines + [""]


def _accuracy(records: list[dict], summary: dict) -> tuple[str, Check]:
    t = THRESHOLDS
    scored = [r for r in records if r.get("top1") is not None]
    teacher = summary.get("teacher_top1")
    if not scored:
        return "student: no accuracy measured (no data.eval)", Check("student learns", None, "no labeled set (data.eval)")
    last = scored[-1]
    k = len(last.get("per_class") or []) or None
    versus = f" = {100 * last['top1'] / teacher:.0f}% of the teacher's {teacher:.2f}%" if teacher else ""
    fact = f"student top-1 {last['top1']:.2f}% after round {last['epoch']}{versus}"
    if k is None:
        return fact, Check("student learns", None, "no per-class counts in the records: the class count is unknown")
    if len(scored) < t.learning_rounds:
        return fact, Check("student learns", None, f"fewer than {t.learning_rounds} KD rounds scored")
    chance = 100.0 / k
    floor = chance + t.chance_margin * (teacher - chance) if teacher else 2 * chance
    rule = (f"chance {chance:.1f}% + {t.chance_margin:.0%} of the teacher's margin = {floor:.1f}%" if teacher
            else f"2x chance = {floor:.1f}%")
    ok = last["top1"] >= floor
    detail = (f"student {last['top1']:.2f}% after {len(scored)} KD rounds" + ("" if ok else ", near chance")
              + f" (threshold {rule})")
    return fact, Check("student learns", ok, detail)


def _teacher_rating(records: list[dict]) -> tuple[str, Check]:
    """The teacher's agreement and CE on the kept images of the last `rating_rounds` rounds that measured them
    (one round's batch is small: its agreement alone is noisy)."""
    rated = [r for r in records if r.get("syn_agreement") is not None][-THRESHOLDS.rating_rounds:]
    if not rated:
        return ("teacher's rating of the synthetic images: not measured (synthesis.metrics=false, or no image kept)",
                Check("teacher agreement", None, "synthesis.metrics=false, or no image kept"))
    agreement = statistics.mean(r["syn_agreement"] for r in rated)
    ces = [r["syn_teacher_ce"] for r in rated if r.get("syn_teacher_ce") is not None]
    epochs = [r["epoch"] for r in rated]
    which = (f"round {epochs[0]}'s" if len(epochs) == 1 else f"rounds {epochs[0]}-{epochs[-1]}'s"
             if epochs == list(range(epochs[0], epochs[-1] + 1)) else f"rounds {', '.join(map(str, epochs))}'s")
    fact = (f"the teacher assigns {agreement:.0f}% of {which} kept images to their target class"
            + (f" (its CE on them {statistics.mean(ces):.2f})" if ces else ""))
    ok = agreement >= THRESHOLDS.min_agreement
    detail = (f"teacher agreement {agreement:.0f}% on {which} kept images"
              + ("" if ok else ": they do not show the classes they were made for; the scale-free BN term "
                 f"synthesis.bn_loss=relative with synthesis.a_bn = {RELATIVE_A_BN_PER_A_CLS:g} x a_cls is the fix "
                 "to try (README: the BN term on any teacher)")
              + f" (threshold {THRESHOLDS.min_agreement:.0f}%)")
    return fact, Check("teacher agreement", ok, detail)


def _count_check(records: list[dict], name: str, keys: dict[str, str], what: str, threshold: str) -> Check:
    """A count that should stay 0: `keys` maps the keys summed over the records to how the message names them."""
    counts = {label: sum(r.get(key) or 0 for r in records) for key, label in keys.items()}
    total = sum(counts.values())
    seen = ", ".join(f"{v} {label}" for label, v in counts.items() if v) if total else f"no {what}"
    return Check(name, total == 0, f"{seen} ({threshold})")


def round_seconds(records: list[dict]) -> list[float]:
    """Each round's wall time: its `round_time` (both runners log it), else the difference of the cumulative
    `elapsed` (records that carry only that)."""
    times, before = [], 0.0
    for r in records:
        times.append(r["round_time"] if "round_time" in r else r.get("elapsed", before) - before)
        before = r.get("elapsed", before)
    return times


def _slow_rounds(records: list[dict]) -> Check:
    t = THRESHOLDS
    slow, compared = [], 0
    timed = list(zip(records, round_seconds(records)))
    for phase in ("warmup", "kd"):
        pairs = [(r, s) for r, s in timed if r.get("phase") == phase and not r.get("trainer_start")]
        if len(pairs) < t.min_rounds_for_median:
            continue
        compared += len(pairs)
        median = statistics.median(s for _, s in pairs)
        slow += [f"round {r['epoch']} took {s:.0f} s, {s / median:.1f}x the {phase} median of {median:.0f} s"
                 for r, s in pairs if median > 0 and s > t.slow_round * median]
    threshold = f"threshold {t.slow_round:g}x the median round of its phase"
    if not compared:
        return Check("round times", None, f"fewer than {t.min_rounds_for_median} rounds of a phase ({threshold})")
    return Check("round times", not slow, ("; ".join(slow) if slow else "no round far above its phase's median")
                 + f" ({threshold})")


def latest_rounds(records: list[dict]) -> list[dict]:
    """Each round's last record, in log order: a round logged twice (killed between its metrics line and its
    checkpoint, then run again on resume) counts once, as rerun."""
    latest = {r.get("epoch"): i for i, r in enumerate(records)}
    return [r for i, r in enumerate(records) if latest[r.get("epoch")] == i]


def judge(records: list[dict], summary: dict, time_split: str = "") -> Verdict:
    """The verdict of a run's rounds (metrics.jsonl records, in order) and its summary ({} while it runs);
    `time_split` is the report's one-line account of where the time went (a fact, not a check). A round logged
    twice (killed between its metrics line and its checkpoint, then run again on resume) counts once, as rerun."""
    records = latest_rounds(records)
    accuracy_fact, learns = _accuracy(records, summary)
    rating_fact, agreement = _teacher_rating(records)
    checks = (agreement, learns,
              _count_check(records, "non-finite steps", {"syn_nonfinite_steps": "non-finite generator steps",
                                                         "kd_nonfinite_steps": "non-finite KD steps"},
                           "non-finite steps", "threshold 0: on_nonfinite=skip left these steps out"),
              _count_check([*records, summary], "excluded shards", {"excluded_shards": "excluded shards",
                                                                    "excluded_on_resume": "excluded shards on resume"},
                           "excluded shards", "threshold 0: shards that failed their checksum, never trained on"),
              _slow_rounds(records))
    facts = (accuracy_fact, rating_fact, *([time_split] if time_split else []))
    return Verdict(checks, facts)
