"""The cases of scripts/fault_campaign.py, generated from families; imported once, before the children fork."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cyclelab import Engine, Trace, load
from cyclelab.loading import fetch as fetching
from cyclelab.loading import loader

CATEGORIES = (
    "integrity",
    "permissions",
    "disk",
    "concurrency",
    "bad input",
    "hand-edited files",
    "workshop folders",
    "int8",
    "kernels",
)
ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = loader.REPO_DATA
REAL_CACHE = fetching.cache_dir()
PY = sys.executable

torch.set_num_threads(1)
TINY = load("tiny")
ENGINE = Engine(TINY)
BASE_TRACE = ENGINE.generate("ROMEO:", max_new_tokens=3)
LESSON = REAL_DATA / "lessons" / "read.json"


class Refused(Exception):
    """A command-line tool's non-zero exit, with what it printed."""


@dataclass
class Case:
    """One fault: ``call(ctx)`` runs in a forked child after ``setup(ctx)``; ``expect`` is what is right."""

    name: str
    category: str
    call: Callable
    expect: str = "error"  # "error": a clear error is right; "ok": a result is; "either": both are
    names: tuple[str, ...] = ()  # what a clear message must mention (case-insensitively)
    check: Callable | None = None  # for a result: True when it is right (else silent)
    setup: Callable | None = None
    user: str | None = None  # "nobody": drop root before setup's last step and the call
    timeout: float = 60
    slow: bool = False  # left out of --quick
    notes: dict = field(default_factory=dict)


def case(*args, **kw) -> Case:
    return Case(*args, **kw)


# ------------------------------------------------------------------ copies and damage
def own(path: Path) -> Path:
    """A private copy in place of a hard link, so changing it cannot reach the real file."""
    if path.is_file() and not path.is_symlink() and path.stat().st_nlink > 1:
        tmp = path.with_name(path.name + ".own")
        shutil.copyfile(path, tmp)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    return path


def copy_data(ctx) -> Path:
    """data/tiny and data/tiny-mlm copied (hard links) under the case's folder; load('tiny') reads them."""
    data = ctx["dir"] / "data"
    for name in ("tiny", "tiny-mlm", "lessons"):
        shutil.copytree(REAL_DATA / name, data / name, copy_function=os.link)
    loader.REPO_DATA = data
    return data


def copy_cache(ctx) -> Path:
    """The asset cache rebuilt from hard links; $CYCLELAB_CACHE points at it."""
    cache = ctx["dir"] / "cache"
    shutil.copytree(REAL_CACHE, cache, copy_function=os.link, ignore=shutil.ignore_patterns("tokens", "*.lock"))
    os.environ["CYCLELAB_CACHE"] = str(cache)
    return cache


def damage(path: Path, how: str) -> None:
    """Change ``path`` one way (its parent must be a private copy)."""
    if how == "bitflip":
        own(path)
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 1]))
    elif how == "truncate":
        own(path)
        os.truncate(path, path.stat().st_size // 2)
    elif how == "empty":
        own(path)
        os.truncate(path, 0)
    elif how == "delete":
        path.unlink()
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "unreadable":
        own(path).chmod(0)
    elif how == "symlink-loop":
        path.unlink()
        path.symlink_to(path.name)
    elif how == "dangling":
        path.unlink()
        path.symlink_to(path.name + ".gone")
    elif how == "extra":  # a stray file beside it
        (path.parent / "stray.safetensors").write_bytes(b"\0" * 16)
    else:
        raise ValueError(how)


DAMAGES = ("bitflip", "truncate", "empty", "delete", "directory", "unreadable", "symlink-loop", "dangling")
HARMLESS_TINY = {"README.md", "metrics.json", "train_output.txt", "training_curve.png", "training_log.csv"}


def load_fresh(name: str):
    return repr(load(name, cache=False))


def doctor_says(part: str):
    """The doctor's checks of one part, as (ok, detail) pairs; a wrong 'all is well' is silent."""
    from cyclelab import doctor

    found = getattr(doctor, part)()
    return [(c.ok, c.detail) for c in (found if isinstance(found, list) else [found])]


def all_failed_clearly(checks) -> bool:
    return not any(ok for ok, _ in checks)


def cli(*argv: str) -> str:
    """Run ``cyclelab ARGV`` in-process; Refused (with its output) unless it exits 0."""
    from cyclelab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else 2
    if rc:
        raise Refused(f"exit {rc}: {err.getvalue()[-1500:]} {out.getvalue()[-500:]}")
    return out.getvalue()[-500:]


# ------------------------------------------------------------------ families
def integrity_cases() -> list:
    cases = []
    for model in ("tiny", "tiny-mlm"):
        for path in sorted((REAL_DATA / model).iterdir()):
            for how in DAMAGES:
                harmless = path.name in HARMLESS_TINY
                category = "permissions" if how == "unreadable" else "integrity"

                def setup(ctx, name=path.name, how=how, model=model):
                    damage(copy_data(ctx) / model / name, how)

                cases.append(
                    case(
                        f"load({model!r}) with data/{model}/{path.name} {how}",
                        category,
                        lambda ctx, model=model: load_fresh(model),
                        expect="ok" if harmless else "error",
                        names=()
                        if harmless
                        else (path.name if how != "delete" or path.name != "SHA256SUMS" else SUMS,),
                        setup=setup,
                        user="nobody" if how == "unreadable" else None,
                        slow=model == "tiny-mlm",
                    )
                )
                if model == "tiny" and not harmless:
                    cases.append(
                        case(
                            f"doctor on data/tiny/{path.name} {how}",
                            category,
                            lambda ctx: doctor_says("_tiny")[0],
                            expect="ok",
                            check=lambda v: v[0] is False,
                            setup=setup,
                            user="nobody" if how == "unreadable" else None,
                        )
                    )
        for how in ("extra",):

            def setup(ctx, model=model):
                damage(copy_data(ctx) / model / "config.json", "extra")

            cases.append(case(f"load({model!r}) with a stray .safetensors", "integrity", lambda ctx, m=model: load_fresh(m),
                              names=("stray.safetensors",), setup=setup))  # fmt: skip
    # SHA256SUMS edited by hand
    edits = {
        "a line removed": lambda t: "".join(t.splitlines(True)[1:]),
        "a hash changed": lambda t: ("0" if t[0] != "0" else "1") + t[1:],
        "junk appended": lambda t: t + "not a checksum line\n",
        "CRLF line ends": lambda t: t.replace("\n", "\r\n"),
        "upper-case hashes": lambda t: "\n".join(line[:64].upper() + line[64:] for line in t.splitlines()) + "\n",
        "a name that does not exist": lambda t: t + "0" * 64 + "  ghost.json\n",
        "a path outside the folder": lambda t: t + "0" * 64 + "  ../../etc/passwd\n",
    }
    for what, edit in edits.items():

        def setup(ctx, edit=edit):
            sums = own(copy_data(ctx) / "tiny" / SUMS)
            sums.write_text(edit(sums.read_text()))

        ok = what in ("CRLF line ends", "upper-case hashes")
        cases.append(case(f"load('tiny') with SHA256SUMS: {what}", "hand-edited files", lambda ctx: load_fresh("tiny"),
                          expect="either" if ok else "error", names=(SUMS,) if not ok else (), setup=setup))  # fmt: skip

    # a model file changed and its SHA256SUMS line recomputed to match: the package's own record must catch it
    def resummed(ctx):
        folder = copy_data(ctx) / "tiny"
        damage(folder / "model.safetensors", "bitflip")
        from cyclelab.loading.checksums import model_files, write_sums

        own(folder / SUMS).unlink()
        write_sums(folder, model_files(folder))

    # This is also how a retrained model is recorded (cyclelab train-tiny writes data/tiny and its SHA256SUMS), so
    # load() accepts it by design; the doctor must say that the files differ from the shipped model.
    cases.append(case("load('tiny') with changed weights and a SHA256SUMS recomputed (as a retrain writes)", "integrity",
                      lambda ctx: load_fresh("tiny"), expect="ok", check=lambda v: "GPT2LMHeadModel" in v,
                      setup=resummed))  # fmt: skip
    cases.append(case("doctor on changed weights with a SHA256SUMS recomputed: says they differ from the shipped",
                      "integrity", lambda ctx: doctor_says("_tiny")[0], expect="ok",
                      check=lambda v: "model.safetensors differ from the model this cyclelab ships" in v[1],
                      setup=resummed))  # fmt: skip
    # config edits
    config_edits = {
        "vocab_size 0": {"vocab_size": 0},
        "n_layer -1": {"n_layer": -1},
        "n_embd huge": {"n_embd": 10**9},
        "n_head not dividing": {"n_head": 7},
        "architectures unknown": {"architectures": ["NoSuchModel"]},
        "model_type unknown": {"model_type": "nosuch"},
        "n_positions 1": {"n_positions": 1},
    }
    for what, change in config_edits.items():

        def setup(ctx, change=change):
            folder = copy_data(ctx) / "tiny"
            config = json.loads((folder / "config.json").read_text())
            config.update(change)
            own(folder / "config.json").write_text(json.dumps(config))
            from cyclelab.loading.checksums import model_files, write_sums

            write_sums(folder, model_files(folder))

        cases.append(case(f"load of a tiny folder whose config has {what} (sums recomputed)", "hand-edited files",
                          lambda ctx: load_fresh(str(ctx["dir"] / "data" / "tiny")), names=("config",),
                          setup=setup))  # fmt: skip
    return cases


SUMS = "SHA256SUMS"
SMOL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "chat_template.jinja", SUMS, ".complete")  # fmt: skip


def smollm2_cases() -> list:
    cases = []
    for name in SMOL_FILES:
        for how in ("bitflip", "truncate", "empty", "delete", "directory", "dangling"):
            if name == ".complete" and how in ("bitflip", "truncate", "empty"):
                continue

            def setup(ctx, name=name, how=how):
                damage(copy_cache(ctx) / "models" / "smollm2" / name, how)

            label = f"models/smollm2/{name} {how}"
            if not (name == ".complete" or (name == SUMS and how != "delete")):
                cases.append(case(f"doctor on {label}", "integrity", lambda ctx: doctor_says("_smollm2_cache"),
                                  expect="ok", check=all_failed_clearly, setup=setup))  # fmt: skip
            elif name == SUMS:
                cases.append(case(f"doctor on {label}", "integrity", lambda ctx: doctor_says("_smollm2_cache"),
                                  expect="ok", check=all_failed_clearly, setup=setup))  # fmt: skip
            heavy = name in ("model.safetensors", ".complete") and how in ("delete", "directory", "dangling")
            cases.append(case(f"load('smollm2') with {label}", "integrity", lambda ctx: load_fresh("smollm2"),
                              expect="either" if name == ".complete" or heavy else "error",
                              check=lambda v: "LlamaForCausalLM" in v, names=() if heavy or name == ".complete" else (name,),
                              setup=setup, slow=True, timeout=400 if heavy else 90))  # fmt: skip
    for key, member in (("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), ("minilm", "model.safetensors")):
        for how in ("bitflip", "truncate", "delete"):

            def setup(ctx, key=key, member=member, how=how):
                copy_cache(ctx)
                folder = fetching.asset_path(key)
                target = folder if folder.name == member else next(p for p in folder.rglob(member))
                damage(target, how)

            cases.append(case(f"doctor on the {key} asset's {member} {how}", "integrity",
                              lambda ctx, key=key: [c for c in doctor_says("_assets") if key in c[1] or not c[0]],
                              expect="ok", check=lambda v: v and not v[0][0], setup=setup))  # fmt: skip
            cases.append(case(f"verify_asset({key!r}) with {member} {how}", "integrity",
                              lambda ctx, key=key: fetching.verify_asset(key), names=(member if how != "delete" else key,),
                              setup=setup))  # fmt: skip
    # cli fetch smollm2 without SHA256SUMS in the converted cache: what does it say, and load?
    cases.append(case("doctor on a smollm2 cache without SHA256SUMS agrees with load()", "integrity",
                      lambda ctx: doctor_says("_smollm2_cache"), expect="ok",
                      check=lambda v: not v[0][0] and "unnoticed" not in v[0][1] and "load" in v[0][1],
                      setup=lambda ctx: (copy_cache(ctx) / "models" / "smollm2" / SUMS).unlink()))  # fmt: skip
    return cases


def permission_cases() -> list:
    cases = []

    def cache_mode(mode, sub=""):
        def setup(ctx):
            cache = copy_cache(ctx)
            (cache / sub).chmod(mode)

        return setup

    cases.append(case("load('smollm2') as another user from a complete read-only cache", "permissions",
                      lambda ctx: load_fresh("smollm2"), expect="ok", check=lambda v: "Llama" in v,
                      setup=cache_mode(0o755), user="nobody", slow=True, timeout=120))  # fmt: skip
    for mode, sub in ((0o700, ""), (0o700, "models"), (0o700, "models/smollm2"), (0o711, "models/smollm2")):
        cases.append(case(f"load('smollm2') as another user, cache {sub or '.'} mode {mode:o}", "permissions",
                          lambda ctx: load_fresh("smollm2"), names=("chmod",), setup=cache_mode(mode, sub),
                          user="nobody", timeout=120))  # fmt: skip
        cases.append(case(f"doctor as another user, cache {sub or '.'} mode {mode:o}", "permissions",
                          lambda ctx: doctor_says("_smollm2_cache"), expect="ok", check=all_failed_clearly,
                          setup=cache_mode(mode, sub), user="nobody"))  # fmt: skip

    def no_smol(ctx):
        cache = copy_cache(ctx)
        shutil.rmtree(cache / "models" / "smollm2")
        cache.chmod(0o755)
        (cache / "models").chmod(0o755)

    cases.append(case("load('smollm2') as another user, not converted, cache not writable", "permissions",
                      lambda ctx: load_fresh("smollm2"), names=("smollm2",), setup=no_smol, user="nobody"))  # fmt: skip
    cases.append(case("Trace.save into a folder the user may not write", "permissions",
                      lambda ctx: BASE_TRACE.save("/root/x-trace.json"), names=("x-trace.json",), user="nobody"))  # fmt: skip
    cases.append(case("Trace.load of a file the user may not read", "permissions",
                      lambda ctx: Trace.load(ctx["dir"] / "t.json"), names=("t.json",), user="nobody",
                      setup=lambda ctx: (BASE_TRACE.save(ctx["dir"] / "t.json"), (ctx["dir"] / "t.json").chmod(0))))  # fmt: skip
    cases.append(case("Lesson.load of a file the user may not read", "permissions",
                      lambda ctx: _lesson_load(ctx["dir"] / "l.json"), names=("l.json",), user="nobody",
                      setup=lambda ctx: (shutil.copy(LESSON, ctx["dir"] / "l.json"), (ctx["dir"] / "l.json").chmod(0))))  # fmt: skip
    return cases


def _lesson_load(path):
    from cyclelab.workshop.lessons import Lesson

    return repr(Lesson.load(path))


def mount_tmpfs(ctx, size: str) -> Path:
    mnt = ctx["dir"] / "mnt-disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    return mnt


def fill(mnt: Path) -> None:
    with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
        while True:
            f.write(b"\0" * (1 << 16))


def _nb(folder: Path, rel: str, text: str) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def disk_cases() -> list:
    cases = []

    def full(ctx):
        mnt = mount_tmpfs(ctx, "2m")
        (mnt / "t.json").write_text("{}")
        fill(mnt)
        ctx["mnt"] = mnt

    cases.append(case("Trace.save on a full disk", "disk", lambda ctx: BASE_TRACE.save(ctx["dir"] / "mnt-disk" / "t2.json"),
                      names=("t2.json", "space"), setup=full))  # fmt: skip
    cases.append(case("Trace.save over an old file on a full disk keeps it", "disk",
                      lambda ctx: BASE_TRACE.save(ctx["dir"] / "mnt-disk" / "t.json"), names=("t.json", "space"),
                      setup=full))  # fmt: skip

    def lesson_save(ctx):
        from cyclelab.workshop.lessons import Lesson

        Lesson.load(LESSON).save(ctx["dir"] / "mnt-disk" / "l.json")

    cases.append(case("Lesson.save on a full disk", "disk", lesson_save, names=("l.json", "space"), setup=full))

    def ro(ctx):
        target = ctx["dir"] / "mnt-ro"
        target.mkdir()
        subprocess.run(["mount", "--bind", str(ctx["dir"]), str(target)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)

    cases.append(case("Trace.save on a read-only mount", "disk", lambda ctx: BASE_TRACE.save(ctx["dir"] / "mnt-ro" / "t.json"),
                      names=("t.json",), setup=ro))  # fmt: skip

    def ro_cache(ctx):
        cache = copy_cache(ctx)
        shutil.rmtree(cache / "models" / "smollm2")
        target = ctx["dir"] / "mnt-ro"
        target.mkdir()
        subprocess.run(["mount", "--bind", str(cache), str(target)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        os.environ["CYCLELAB_CACHE"] = str(target)

    cases.append(case("load('smollm2') needing a conversion in a read-only cache", "disk", lambda ctx: load_fresh("smollm2"),
                      names=("read-only",), setup=ro_cache, timeout=120))  # fmt: skip

    def small_cache(ctx):
        mnt = mount_tmpfs(ctx, "160m")
        shutil.copytree(REAL_CACHE / "assets", mnt / "assets", ignore=shutil.ignore_patterns("gt-*", "shakespeare*"))
        os.environ["CYCLELAB_CACHE"] = str(mnt)

    cases.append(case("conversion of smollm2 into a cache on a nearly full disk", "disk", lambda ctx: load_fresh("smollm2"),
                      names=("space",), setup=small_cache, slow=True, timeout=400))  # fmt: skip
    cases.append(case("grade --out on a full disk", "disk",
                      lambda ctx: cli("grade", str(ctx["dir"] / "sub"), "--out", str(ctx["dir"] / "mnt-disk" / "g.csv")),
                      names=("g.csv",), setup=lambda ctx: (full(ctx), _nb(ctx["dir"], "sub/ann/zz.ipynb", "{}"))))  # fmt: skip
    return cases


def concurrency_cases() -> list:
    cases = []
    script = (
        "import os,sys; os.environ['CYCLELAB_CACHE']=sys.argv[1];"
        "from cyclelab.loading.loader import smollm2_folder; print(smollm2_folder())"
    )

    def two_converting(ctx):
        cache = copy_cache(ctx)
        shutil.rmtree(cache / "models" / "smollm2")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        pipe = subprocess.PIPE
        procs = [subprocess.Popen([PY, "-c", script, str(cache)], env=env, stdout=pipe, stderr=pipe) for _ in range(2)]
        outs = [p.communicate(timeout=500) for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a converter failed: {outs}")
        return load_fresh("smollm2")

    cases.append(case("two processes converting smollm2 at once", "concurrency", two_converting, expect="ok",
                      check=lambda v: "Llama" in v, slow=True, timeout=560))  # fmt: skip

    def killed_converting(ctx):
        cache = copy_cache(ctx)
        shutil.rmtree(cache / "models" / "smollm2")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([PY, "-c", script, str(cache)], env=env)
        staging = cache / "models" / "smollm2.partial"
        for _ in range(600):
            if (staging / "model.safetensors").exists() or (cache / "models" / "smollm2").exists():
                break
            import time

            time.sleep(0.1)
        proc.kill()
        proc.wait()
        return load_fresh("smollm2")

    cases.append(case("kill -9 during the conversion, then load", "concurrency", killed_converting, expect="ok",
                      check=lambda v: "Llama" in v, slow=True, timeout=560))  # fmt: skip

    def lock_held(ctx):
        import fcntl

        cache = copy_cache(ctx)
        shutil.rmtree(cache / "models" / "smollm2")
        lock = open(cache / "models" / "smollm2.lock", "w")  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = dict(os.environ, PYTHONPATH=str(ROOT), CYCLELAB_LOCK_TIMEOUT="2")
        out = subprocess.run([PY, "-c", script, str(cache)], env=env, capture_output=True, text=True, timeout=100)
        if out.returncode:
            raise Refused(out.stderr.strip().splitlines()[-1])
        return out.stdout

    cases.append(case("a conversion waiting on a lock that is never released", "concurrency", lock_held,
                      names=("lock",), timeout=120))  # fmt: skip

    def bad_lock_timeout(ctx):
        os.environ["CYCLELAB_LOCK_TIMEOUT"] = "soon"
        cache = copy_cache(ctx)
        shutil.rmtree(cache / "models" / "smollm2")
        return load_fresh("smollm2")

    cases.append(case("CYCLELAB_LOCK_TIMEOUT not a number", "concurrency", bad_lock_timeout,
                      names=("CYCLELAB_LOCK_TIMEOUT",)))  # fmt: skip

    def interleaved(ctx):
        a = ENGINE.run("ROMEO:", 4)
        b = ENGINE.run("JULIET:", 4)
        from cyclelab.core.engine import drain

        done = {}
        while len(done) < 2:
            for key, gen in (("a", a), ("b", b)):
                if key in done:
                    continue
                try:
                    next(gen)
                except StopIteration as stop:
                    done[key] = stop.value
        alone = ENGINE.generate("ROMEO:", 4), ENGINE.generate("JULIET:", 4)
        del drain
        return done["a"].token_ids == alone[0].token_ids and done["b"].token_ids == alone[1].token_ids

    cases.append(case("two runs interleaved on one engine", "concurrency", interleaved, expect="ok", check=bool))
    return cases
