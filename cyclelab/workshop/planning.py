"""Running a workshop: a quiet JupyterLab, server sizing and agendas from the measured chapters.

    python -m cyclelab.workshop lab-settings [--settings-dir DIR]   install the JupyterLab overrides
    python -m cyclelab.workshop tables [--profile fast|full]        sizing table and agendas (markdown)
    python -m cyclelab.workshop reading-time [--update]             each chapter's reading time, under its title

The numbers come from each chapter's cost label (``cyclelab course --label PROFILE`` writes it:
seconds and peak memory of the chapter's kernel), from the chapter's text and from the exercises
it checks. docs/workshop.md prints what ``tables`` writes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cyclelab.loading.paths import LAB_OVERRIDES, LESSONS

COST = re.compile(
    r"\*\*Cost, (?P<profile>[\w-]+) profile:\*\* (?P<seconds>\d+(?:\.\d+)?) s"
    r", peak memory (?P<gb>\d+(?:\.\d+)?) GB"
)
READING_TIME = re.compile(r"\n*\*\*Reading time:\*\* about (?P<minutes>\d+) minutes[^\n]*<!-- reading-time -->")
EXERCISE = re.compile(r"\bcheck_\w+(?=\()")
STAGES_LINE = re.compile(r"\*Stages? covered:((?:\*\*[^*]+\*\*|[^*])*)\*")
STAGE_NAMES = ("FETCH", "READ", "EXECUTE", "WRITEBACK")

# Assumptions of the sizing (docs/workshop.md states them; every one is an argument).
LAB_SERVER_MB = 100  # one learner's JupyterLab server: 91 MB RSS measured here (JupyterLab 4.6, idle)
HUB_MB = 128  # TLJH's own overhead, from its resource-estimation guide
OS_MB = 1024  # the operating system and its daemons
HEADROOM = 0.3  # TLJH's guide: the measured maximum plus 20-40 % for learners to play around
SERVERS_GB = (16, 32, 64)

# Assumptions of the agendas.
WORDS_PER_MINUTE = 100  # reading technical text with code beside it
EXERCISE_MINUTES = 10  # one exercise with its check cell
DISCUSSION_MINUTES = 10  # per chapter, with the room
SLACK_MINUTES = 15  # a session may overrun into its break by this much
HALF_DAY = (100, 100)  # two sessions of 100 minutes and a break: 3 h 40 min
FULL_DAY = (100, 100, 100, 100)  # four, with lunch and two breaks: about 8 h


# ------------------------------------------------------------------ a quiet JupyterLab


def lab_settings_dir() -> Path:
    """JupyterLab's application settings folder, ``<app dir>/settings`` (``$JUPYTERLAB_DIR`` moves it)."""
    from jupyterlab.commands import get_app_dir

    return Path(get_app_dir()) / "settings"


def install_lab_settings(settings_dir: Path | None = None, source: Path = LAB_OVERRIDES) -> Path:
    """Merge ``source`` into ``settings_dir/overrides.json`` (other plugins' settings there are kept).

    Returns the file written. A damaged existing overrides file is an error naming it, never overwritten.
    """
    target = (settings_dir or lab_settings_dir()) / "overrides.json"
    merged = _read_json(target) if target.exists() else {}
    for plugin, values in _read_json(source).items():
        merged[plugin] = {**merged.get(plugin, {}), **values}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    return target


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or remove it, then run this again") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(
            f"{path} must map plugin ids to objects of settings, "
            f'e.g. {{"@jupyterlab/apputils-extension:notification": {{...}}}}'
        )
    return data


# ------------------------------------------------------------------ what the chapters cost


@dataclass(frozen=True)
class Chapter:
    """One chapter's measured cost (from its cost label) and its size (words, exercises)."""

    name: str
    seconds: float
    peak_mb: float
    words: int
    exercises: tuple[str, ...]
    stages: tuple[str, ...] = ()


def read_chapter(path: Path, profile: str = "fast") -> Chapter:
    """The chapter's cost label for ``profile``, its markdown word count and its checked exercises."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    text = {kind: ["".join(c["source"]) for c in cells if c["cell_type"] == kind] for kind in ("markdown", "code")}
    first = text["markdown"][0] if cells and cells[0]["cell_type"] == "markdown" else ""
    labels = {m["profile"]: m for m in COST.finditer(first)}
    if profile not in labels:
        raise ValueError(
            f"{path.name} has no cost label for the {profile!r} profile (it has: "
            f"{', '.join(labels) or 'none'}); run `cyclelab course --profile {profile} --label`"
        )
    label = labels[profile]
    words = sum(len(re.findall(r"\w+", READING_TIME.sub("", s))) for s in text["markdown"])
    exercises = tuple(dict.fromkeys(EXERCISE.findall("\n".join(text["code"]))))
    return Chapter(
        path.stem, float(label["seconds"]), float(label["gb"]) * 1024, words, exercises, chapter_stages(first)
    )


def chapter_stages(first_cell: str) -> tuple[str, ...]:
    """The stages a chapter's "*Stage(s) covered: ...*" line names (none for "all four")."""
    found = STAGES_LINE.search(first_cell)
    if not found or "all four" in found.group(1):
        return ()
    return tuple(s for s in STAGE_NAMES if re.search(rf"\b{s}\b", found.group(1)))


def course_lessons(folder: Path = LESSONS) -> dict[str, str]:
    """Stage -> name of the shipped lesson for it (``Lesson.load(name)``)."""
    return {json.loads(p.read_text(encoding="utf-8"))["stage"]: p.stem for p in sorted(folder.glob("*.json"))}


def lessons_by_chapter(chapters: list[Chapter], lessons: dict[str, str]) -> dict[str, list[str]]:
    """Each lesson goes with the first chapter, in course order, that covers its stage."""
    placed: dict[str, list[str]] = {c.name: [] for c in chapters}
    for stage, lesson in lessons.items():
        first = next((c.name for c in chapters if stage in c.stages), None)
        if first:
            placed[first].append(lesson)
    return placed


# ------------------------------------------------------------------ sizing


@dataclass(frozen=True)
class Sizing:
    """Memory one active learner needs for a chapter, and how many fit on each server size."""

    chapter: str
    kernel_mb: float
    learner_mb: float
    learners: dict[int, int]  # server GB -> concurrent learners


def learner_mb(kernel_mb: float, server_mb: float = LAB_SERVER_MB, headroom: float = HEADROOM) -> float:
    """One active learner: the chapter's kernel peak plus their JupyterLab server, plus headroom."""
    _check_non_negative(kernel_mb=kernel_mb, server_mb=server_mb, headroom=headroom)
    return (kernel_mb + server_mb) * (1 + headroom)


def learners_per_server(server_gb: float, per_learner_mb: float, hub_mb: float = HUB_MB, os_mb: float = OS_MB) -> int:
    """Concurrent learners a server of ``server_gb`` holds once the OS and the hub have their share."""
    _check_non_negative(server_gb=server_gb, hub_mb=hub_mb, os_mb=os_mb)
    if per_learner_mb <= 0:
        raise ValueError(f"per_learner_mb must be positive, got {per_learner_mb}")
    return max(0, math.floor((server_gb * 1024 - hub_mb - os_mb) / per_learner_mb))


def sizing_table(
    peaks_mb: dict[str, float],
    servers_gb: tuple[int, ...] = SERVERS_GB,
    hub_mb: float = HUB_MB,
    os_mb: float = OS_MB,
    server_mb: float = LAB_SERVER_MB,
    headroom: float = HEADROOM,
) -> list[Sizing]:
    """One row per chapter (kernel peak memory in MB), and a last row "whole course" for the largest peak."""
    if not peaks_mb:
        raise ValueError("peaks_mb is empty: give each chapter's peak memory in MB")
    rows = dict(peaks_mb) | {"whole course": max(peaks_mb.values())}
    table = []
    for chapter, kernel in rows.items():
        need = learner_mb(kernel, server_mb, headroom)
        table.append(
            Sizing(chapter, kernel, need, {gb: learners_per_server(gb, need, hub_mb, os_mb) for gb in servers_gb})
        )
    return table


def memory_limit(table: list[Sizing], step_mb: int = 100) -> str:
    """The hub's memory limit per learner, in JupyterHub's units (M = MiB): the "whole course" row's
    need, rounded up to ``step_mb``. docs/workshop.md uses this one number in every recipe."""
    need = next(row.learner_mb for row in table if row.chapter == "whole course")
    return f"{math.ceil(need / step_mb) * step_mb}M"


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")


# ------------------------------------------------------------------ reading time


def reading_minutes(chapter: Chapter) -> int:
    """A learner's time alone with a chapter: its prose at ``WORDS_PER_MINUTE``, each exercise, and its own
    run (the cost label read); rounded up to 5 minutes."""
    minutes = chapter.words / WORDS_PER_MINUTE + len(chapter.exercises) * EXERCISE_MINUTES + chapter.seconds / 60
    return 5 * math.ceil(minutes / 5 - 1e-9)


def reading_line(chapter: Chapter) -> str:
    """The line under a chapter's title that states its reading time and what it is made of."""
    exercises = len(chapter.exercises)
    return (
        f"**Reading time:** about {reading_minutes(chapter)} minutes: {chapter.words} words at {WORDS_PER_MINUTE} a "
        f"minute, {exercises} exercise{'s' * (exercises != 1)} at {EXERCISE_MINUTES} minutes each and the chapter's "
        f"own run of {chapter.seconds:.0f} s <!-- reading-time -->"
    )


def with_reading_time(first_cell: str, line: str) -> str:
    """``first_cell`` (a chapter's top cell, "# title" first) with ``line`` under its title, replacing an old one."""
    title, _, rest = READING_TIME.sub("", first_cell).partition("\n")
    if not title.startswith("# "):
        raise ValueError(f"a chapter's top cell starts with its '# ' title, got {title[:40]!r}")
    return f"{title}\n\n{line}\n{rest}" if rest.startswith("\n") else f"{title}\n\n{line}\n\n{rest}"


def write_reading_time(path: Path, profile: str = "full") -> str:
    """Write the reading time of the chapter at ``path`` (from ``profile``'s cost label) under its title."""
    chapter = read_chapter(path, profile)
    nb = json.loads(path.read_text(encoding="utf-8"))
    first = "".join(nb["cells"][0]["source"])
    nb["cells"][0]["source"] = with_reading_time(first, reading_line(chapter)).splitlines(keepends=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return reading_line(chapter)


# ------------------------------------------------------------------ agendas


def chapter_minutes(
    chapter: Chapter,
    words_per_minute: float = WORDS_PER_MINUTE,
    exercise_minutes: float = EXERCISE_MINUTES,
    discussion_minutes: float = DISCUSSION_MINUTES,
) -> int:
    """Minutes of class for a chapter: reading, its exercises, its measured run time, and discussion (rounded up)."""
    if words_per_minute <= 0:
        raise ValueError(f"words_per_minute must be positive, got {words_per_minute}")
    minutes = (
        chapter.words / words_per_minute
        + len(chapter.exercises) * exercise_minutes
        + chapter.seconds / 60
        + discussion_minutes
    )
    return math.ceil(minutes - 1e-9)


@dataclass(frozen=True)
class Agenda:
    """Chapters packed into sessions, in course order; ``left_over`` did not fit into the day."""

    sessions: list[list[str]]
    minutes: list[int]
    left_over: list[str]


def pack_agenda(chapters: list[tuple[str, int]], sessions: tuple[int, ...], slack: int = SLACK_MINUTES) -> Agenda:
    """Put chapters (name, minutes), in order, into sessions of the given lengths.

    A chapter never splits. One that does not fit into what is left of a session starts the next,
    unless it overruns the session by at most ``slack`` minutes (taken from the break) and by less
    than the session would otherwise stay unused. Chapters build on each other, so once one fits
    into no session, it and all later chapters are left over (homework).
    """
    if not sessions or any(s <= 0 for s in sessions):
        raise ValueError(f"sessions must be positive lengths in minutes, got {sessions!r}")
    packed: list[list[str]] = [[] for _ in sessions]
    used = [0] * len(sessions)
    current = 0
    for index, (name, minutes) in enumerate(chapters):
        while current < len(sessions) and not _fits(used[current], minutes, sessions[current], slack):
            if not packed[current]:
                raise ValueError(
                    f"chapter {name} takes {minutes} min, longer than a session of "
                    f"{sessions[current]} min (+{slack} min slack)"
                )
            current += 1
        if current == len(sessions):
            return Agenda(packed, used, [n for n, _ in chapters[index:]])
        packed[current].append(name)
        used[current] += minutes
    return Agenda(packed, used, [])


def _fits(used: int, minutes: int, length: int, slack: int) -> bool:
    """Within the session, or overrunning it by at most ``slack`` and by less than stopping would leave free."""
    over = used + minutes - length
    return over <= 0 or (over <= slack and over < length - used)


# ------------------------------------------------------------------ markdown


def sizing_markdown(table: list[Sizing]) -> str:
    gbs = list(table[0].learners)
    lines = [
        "| chapter | kernel peak | per active learner | " + " | ".join(f"learners on {gb} GB" for gb in gbs) + " |",
        "|---|---|---|" + "---|" * len(gbs),
    ]
    for row in table:
        counts = " | ".join(str(row.learners[gb]) for gb in gbs)
        lines.append(f"| {row.chapter} | {row.kernel_mb / 1024:.1f} GB | {row.learner_mb / 1024:.2f} GB | {counts} |")
    return "\n".join(lines)


def agenda_markdown(
    title: str,
    agenda: Agenda,
    chapters: list[Chapter],
    sessions: tuple[int, ...],
    minutes: dict[str, int],
    lessons: dict[str, list[str]] | None = None,
) -> str:
    by_name, lessons = {c.name: c for c in chapters}, lessons or {}
    lines = [
        f"**{title}** ({len(sessions)} sessions of {'/'.join(map(str, sessions))} min)",
        "",
        "| session | chapters (minutes) | exercises | lessons | used |",
        "|---|---|---|---|---|",
    ]
    for number, (names, used, length) in enumerate(zip(agenda.sessions, agenda.minutes, sessions), 1):
        listed = ", ".join(f"{n} ({minutes[n]})" for n in names) or "-"
        exercises = ", ".join(e for n in names for e in by_name[n].exercises) or "-"
        taught = ", ".join(f"`{lesson}`" for n in names for lesson in lessons.get(n, [])) or "-"
        lines.append(f"| {number} | {listed} | {exercises} | {taught} | {used}/{length} min |")
    if agenda.left_over:
        lines += ["", f"Left for homework: {', '.join(agenda.left_over)}."]
    return "\n".join(lines)


def tables(paths: list[Path], profile: str = "fast") -> str:
    """The sizing table and both agendas as markdown, from the notebooks' cost labels."""
    chapters = [read_chapter(p, profile) for p in paths]
    sizing = sizing_table({c.name: c.peak_mb for c in chapters})
    minutes = {c.name: chapter_minutes(c) for c in chapters}
    order = [(c.name, minutes[c.name]) for c in chapters]
    lessons = course_lessons()
    parts = [
        f"Sizing from the `{profile}` profile's cost labels:",
        "",
        sizing_markdown(sizing),
        "",
        "Minutes per chapter: " + ", ".join(f"{n} {m}" for n, m in minutes.items()),
        "",
    ]
    for title, sessions in (("Half day", HALF_DAY), ("Full day", FULL_DAY)):
        agenda = pack_agenda(order, sessions)
        parts += [
            agenda_markdown(title, agenda, chapters, sessions, minutes, lessons_by_chapter(chapters, lessons)),
            "",
        ]
    return "\n".join(parts).rstrip()


_SIZING_BLOCK = re.compile(r"Sizing from the `[\w-]+` profile's cost labels:\n.*?\n\| whole course \|[^\n]*", re.S)
_AGENDA_BLOCK = re.compile(r"Minutes per chapter: .*?(?=\n\n## )", re.S)


def update_doc(doc: Path, printed: str) -> None:
    """Replace the sizing table and the agendas in ``doc`` by ``printed`` (the output of :func:`tables`)."""
    sizing, agendas = printed.split("\n\nMinutes per chapter")
    text = doc.read_text(encoding="utf-8")
    if not (_SIZING_BLOCK.search(text) and _AGENDA_BLOCK.search(text)):
        raise ValueError(f"{doc} has no sizing table and agendas to replace (see docs/workshop.md for the layout)")
    text = _SIZING_BLOCK.sub(lambda _: sizing, text, count=1)
    doc.write_text(_AGENDA_BLOCK.sub(lambda _: "Minutes per chapter" + agendas, text, count=1), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from cyclelab.workshop.course import list_notebooks

    parser = argparse.ArgumentParser(prog="python -m cyclelab.workshop.planning", description="Workshop helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab-settings", help="install data/jupyterlab/overrides.json into JupyterLab's settings")
    lab.add_argument("--settings-dir", type=Path, help="default: <JupyterLab app dir>/settings of this Python")
    tab = sub.add_parser("tables", help="print the sizing table and the agendas as markdown")
    tab.add_argument("--profile", default="fast", help="whose cost labels to read (default: fast)")
    tab.add_argument("--update", type=Path, metavar="DOC", help="write them into DOC (docs/workshop.md) instead")
    read = sub.add_parser("reading-time", help="print each chapter's reading time (from its full cost label)")
    read.add_argument("--update", action="store_true", help="write it under each chapter's title")
    args = parser.parse_args(argv)
    try:
        if args.command == "lab-settings":
            print(f"JupyterLab overrides: {install_lab_settings(args.settings_dir)}")
        elif args.command == "reading-time":
            for path in list_notebooks():
                line = write_reading_time(path) if args.update else reading_line(read_chapter(path, "full"))
                print(f"{path.stem}: {line}")
        elif args.update:
            update_doc(args.update, tables(list_notebooks(), args.profile))
        else:
            print(tables(list_notebooks(), args.profile))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
