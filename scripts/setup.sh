#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install graphprune into it.
#
# Idempotent: safe to run again and again; a second run with an unchanged pyproject.toml is a
# no-op that takes about a second.
#
# torch is installed FIRST and on its own, because graphprune and its dev extras only ask for
# torch>=2.4: left to the resolver, a bare range pulls the newest CUDA build (several GB). The
# default spec, torch==2.13.0, resolves to a local CPU build on the project's machines; elsewhere,
# point GRAPHPRUNE_TORCH_SPEC at what suits you, e.g.
#   GRAPHPRUNE_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
# The test environment is pinned: every package is installed under requirements/constraints.txt,
# so a fresh clone gets the versions the suite was last run with, not whatever was released today.
# GRAPHPRUNE_CONSTRAINTS=none installs the newest versions instead (see README, "Newest versions").
# Other knobs: PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.graphprune-setup-stamp"
PIP=("$VPY" -m pip --disable-pip-version-check --no-input -q)

LOG="$(mktemp -t graphprune-setup.XXXXXX)"
trap 'rm -f "$LOG"' EXIT

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
# pip, with its chatter (build-backend warnings included) kept in $LOG and shown only on failure.
pip_quiet() {
    if ! "${PIP[@]}" "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        die "pip $* failed (full output above)"
    fi
}

command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python >= 3.10 or set PYTHON=..."
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "graphprune needs Python >= 3.10; '$PYTHON' is $("$PYTHON" -V 2>&1)"

if [[ ! -x "$VPY" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
    pip_quiet install --upgrade pip
fi

# The stamp records what the last successful install was made from; if nothing changed and the
# package still imports, there is nothing to do.
CONSTRAINTS="${GRAPHPRUNE_CONSTRAINTS:-$ROOT/requirements/constraints.txt}"
CONSTRAINT_ARGS=()
if [[ "$CONSTRAINTS" != "none" ]]; then
    [[ -f "$CONSTRAINTS" ]] || die "constraints file '$CONSTRAINTS' not found (GRAPHPRUNE_CONSTRAINTS=none to go unpinned)"
    CONSTRAINT_ARGS=(-c "$CONSTRAINTS")
fi

want_stamp="$(cat pyproject.toml; echo "torch-spec=${GRAPHPRUNE_TORCH_SPEC:-torch==2.13.0}";
    if [[ "$CONSTRAINTS" != "none" ]]; then cat "$CONSTRAINTS"; else echo unpinned; fi)"
if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$want_stamp" ]] \
    && "$VPY" -c 'import graphprune, torch, onnxruntime, pytest' >/dev/null 2>&1; then
    say "environment up to date ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
    exit 0
fi

if ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
    spec="${GRAPHPRUNE_TORCH_SPEC:-torch==2.13.0}"
    say "installing $spec"
    # Word splitting is intended: the spec may carry pip options such as --index-url.
    # shellcheck disable=SC2086
    pip_quiet install $spec
fi

say "installing graphprune (editable) with dev extras${CONSTRAINT_ARGS:+ under ${CONSTRAINTS#"$ROOT"/}}"
pip_quiet install -e ".[dev]" "${CONSTRAINT_ARGS[@]}"

"$VPY" -c 'import graphprune, torch, onnx, onnxruntime' \
    || die "graphprune does not import after installation"
printf '%s' "$want_stamp" > "$STAMP"
say "done ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
