#!/usr/bin/env bash
# Installs cosyserve with a pinned torch into the current Python environment. The container images run
# this script, and CI runs it in a fresh virtual environment, so what the images install is tested here.
#
#   docker/install.sh [SOURCE_DIR]      (default: the checkout this script lies in)
#
# Environment:
#   PYTHON           the interpreter whose environment receives the package (default python3)
#   TORCH_SPEC       the torch requirement (default torch==2.13.0; empty: keep the torch already there)
#   TORCH_INDEX_URL  where torch comes from, e.g. https://download.pytorch.org/whl/cpu (default: pip's index)
#   EXTRAS           the package's optional extras (default postgres: the shared voice store)
set -euo pipefail

src="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC-torch==2.13.0}"
extras="${EXTRAS-postgres}"
pip=("$python" -m pip install --disable-pip-version-check)

if [ -n "$torch_spec" ]; then
    # torch first and on its own: the index that has the wanted build (CPU or CUDA) need not have the rest.
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_spec"
fi
"${pip[@]}" "${src}${extras:+[$extras]}"
"$python" -c "import cosyserve, torch; print('cosyserve installed with torch', torch.__version__)"
