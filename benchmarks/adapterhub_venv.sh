#!/usr/bin/env bash
# A separate venv with AdapterHub (`adapters` 1.3.0), which needs transformers 4.57, for
# benchmarks/parity_adapterhub.py and `benchmarks/speed.py --adapterhub`. peftlab is installed
# editable from this repo, so the comparison runs against the working tree.
#
#   bash benchmarks/adapterhub_venv.sh [VENV_DIR]      # default /tmp/peftlab-ah
#   /tmp/peftlab-ah/bin/python benchmarks/parity_adapterhub.py
#   /tmp/peftlab-ah/bin/python benchmarks/speed.py --adapterhub
#
# torch is pinned to 2.13.0 (the CPU wheel this machine has): any other version makes pip
# download a multi-GB CUDA build. The constraints file holds every install step to the pins.
set -euo pipefail

VENV="${1:-${PEFTLAB_AH_VENV:-/tmp/peftlab-ah}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

"$PY" -m venv "$VENV"
PIN="$VENV/adapterhub-constraints.txt"
printf '%s\n' 'torch==2.13.0' 'transformers>=4.57,<4.58' 'adapters==1.3.0' > "$PIN"

pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip_ install -q -c "$PIN" 'torch==2.13.0'
pip_ install -q -c "$PIN" 'transformers>=4.57,<4.58' 'adapters==1.3.0' peft pytest hypothesis
pip_ install -q -c "$PIN" -e "$REPO"

# Fail loudly if the resolver moved a pin.
"$VENV/bin/python" - <<'EOF'
import adapters, torch, transformers, peft, peftlab
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert transformers.__version__.startswith("4.57."), transformers.__version__
assert adapters.__version__ == "1.3.0", adapters.__version__
print(f"torch {torch.__version__}, transformers {transformers.__version__}, adapters "
      f"{adapters.__version__}, peft {peft.__version__}, peftlab from {peftlab.__file__}")
EOF
