#!/usr/bin/env bash
# One command for a fresh machine: create (or reuse) the Python environment, install densebeam with
# everything its tests need, then run the main job on the bundled sample corpus and default model.
#
#   DENSEBEAM_VENV=/path/venv        where the environment lives (default: ~/.cache/densebeam/venv;
#                                    kept between runs so torch is not downloaded again)
#   DENSEBEAM_TORCH_INDEX=URL        pip index to take torch from first, e.g. the CPU-only build at
#                                    https://download.pytorch.org/whl/cpu (PyPI's Linux torch is CUDA)
#   DENSEBEAM_SKIP_MAIN_JOB=1        set up only
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DENSEBEAM_VENV:-$HOME/.cache/densebeam/venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating environment $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
else
  echo "== reusing environment $VENV"
fi
ln -sfn "$VENV" .venv

if [ -n "${DENSEBEAM_TORCH_INDEX:-}" ]; then
  "$VENV/bin/python" -m pip install -q torch --index-url "$DENSEBEAM_TORCH_INDEX"
fi
# Already-satisfied requirements are not downloaded again; no build isolation, so no setuptools fetch.
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[dev,serve,eval]"
"$VENV/bin/python" -c "import torch, apache_beam, faiss, sentence_transformers; \
print('== torch', torch.__version__, '| beam', apache_beam.__version__, '| faiss', faiss.__version__)"

if [ -z "${DENSEBEAM_SKIP_MAIN_JOB:-}" ]; then
  echo "== main job: densebeam build on the bundled sample corpus with the bundled all-MiniLM-L6-v2"
  "$VENV/bin/densebeam" build --input data/sample/corpus.jsonl --output out/sample-index --overwrite
  echo "== result: index bundle $(pwd)/out/sample-index (embeddings: $(pwd)/out/sample-index.embeddings)"
fi
