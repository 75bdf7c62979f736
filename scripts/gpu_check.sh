#!/usr/bin/env bash
# GPU check: the unit and parity tests with the engine on CUDA, then `cosyserve bench` on the full-size
# random-weight CosyVoice2 / Fun-CosyVoice3 in fp32 and bf16 at concurrency 1, 4, 8, 16.
# Run from the repository root on a machine with a CUDA GPU and ../shared beside the checkout:
#   bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${COSYSERVE_SHARED:-../shared}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python3 -m pip install -q -e '.[test]'
export COSYSERVE_TEST_DEVICE=cuda
timeout 1200 python3 -m pytest -q -x tests/unit/test_engine.py tests/unit/test_engine_core.py tests/parity
for model in v2-0.5b v3-0.5b; do
  for dtype in fp32 bf16; do
    timeout 1200 python3 -m cosyserve.cli bench "$shared/golden/fullsize-configs/$model" --random-weights \
      --frontend-from "$shared/golden/models/${model%%-*}-tiny" --blank-en "$shared/golden/fullsize-configs/v2-0.5b/CosyVoice-BlankEN" \
      --device cuda --dtype "$dtype" --concurrency 1,4,8,16 --decode-batches 1,4,8,16 --seconds 9
  done
done
