#!/usr/bin/env bash
# Run the README's install and test commands in a fresh virtual environment, optionally with another transformers.
#
#   tools/test_in_fresh_venv.sh VENV [--transformers VERSION_OR_SOURCE_FOLDER] [pip arguments...]
#
# VENV is created anew. Without --transformers, pip resolves what requirements-dev.txt allows (add `-c FILE` to pin).
# With it, that transformers release (e.g. 5.26.0) or source checkout (e.g. ~/src/transformers, its main branch)
# replaces the resolved one, so the suite shows what the next release will break before users see it.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$1
shift
transformers=""
if [ "${1:-}" = "--transformers" ]; then
  transformers=$2
  shift 2
fi

rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0 -r requirements-dev.txt "$@"
if [ -d "$transformers" ]; then
  pip install -q --no-deps "$transformers"
elif [ -n "$transformers" ]; then
  pip install -q --no-deps "transformers==$transformers"
fi
python -c "import accelerate, datasets, tokenizers, torch, transformers as t; print('testing with transformers', \
t.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'tokenizers', \
tokenizers.__version__, 'torch', torch.__version__)"
python -m pytest -q tests
