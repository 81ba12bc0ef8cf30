#!/usr/bin/env bash
# One command for a fresh machine: create (or reuse) the Python environment, install densebeam with
# everything its tests need, then run the main job on the bundled sample corpus and default model.
#
#   DENSEBEAM_VENV=/path/venv        where the environment lives (default: ~/.cache/densebeam/venv)
#   DENSEBEAM_WHEELS=/path/wheels    the wheelhouse every install comes from (default:
#                                    ~/.cache/densebeam/wheels): filled from the package index once,
#                                    then reused, so a new environment never downloads torch again
#   DENSEBEAM_TORCH_INDEX=URL        pip index to take torch from when the wheelhouse has none, e.g. the
#                                    CPU-only build at https://download.pytorch.org/whl/cpu
#   DENSEBEAM_SKIP_MAIN_JOB=1        set up only
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DENSEBEAM_VENV:-$HOME/.cache/densebeam/venv}"
WHEELS="${DENSEBEAM_WHEELS:-$HOME/.cache/densebeam/wheels}"
PY="${PYTHON:-python3}"
EXTRAS="pipelines,dev,serve,eval"
mkdir -p "$WHEELS"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating environment $VENV"
  "$PY" -m venv "$VENV"
else
  echo "== reusing environment $VENV"
fi
ln -sfn "$VENV" .venv
PIP=("$VENV/bin/python" -m pip)

offline_install() {  # everything from the wheelhouse, nothing from the network
  "${PIP[@]}" install -q --no-index --find-links "$WHEELS" --upgrade pip setuptools wheel \
    && "${PIP[@]}" install -q --no-index --find-links "$WHEELS" --no-build-isolation -e ".[$EXTRAS]"
}

echo "== installing densebeam[$EXTRAS] from the wheelhouse $WHEELS"
if ! offline_install 2>/tmp/densebeam-offline-install.$$; then
  echo "== the wheelhouse lacks some packages: downloading them once (torch is large)"
  if [ -n "${DENSEBEAM_TORCH_INDEX:-}" ]; then
    "${PIP[@]}" download -q -d "$WHEELS" --find-links "$WHEELS" torch --index-url "$DENSEBEAM_TORCH_INDEX"
  fi
  "${PIP[@]}" download -q -d "$WHEELS" --find-links "$WHEELS" pip setuptools wheel
  # The project's own dependencies (its metadata, not the project itself, is what pip resolves here).
  "${PIP[@]}" download -q -d "$WHEELS" --find-links "$WHEELS" ".[$EXTRAS]"
  rm -f "$WHEELS"/densebeam-*  # the project is installed from this checkout, never from the wheelhouse
  offline_install
fi
rm -f /tmp/densebeam-offline-install.$$
"$VENV/bin/python" -c "import torch, apache_beam, faiss, sentence_transformers, densebeam; \
print('== densebeam', densebeam.__version__, '| torch', torch.__version__, '| beam', apache_beam.__version__, \
'| faiss', faiss.__version__)"

if [ -z "${DENSEBEAM_SKIP_MAIN_JOB:-}" ]; then
  echo "== main job: densebeam build on the bundled sample corpus with the bundled all-MiniLM-L6-v2"
  "$VENV/bin/densebeam" build --input data/sample/corpus.jsonl --output out/sample-index --overwrite
  echo "== result: index bundle $(pwd)/out/sample-index (embeddings: $(pwd)/out/sample-index.embeddings)"
fi
