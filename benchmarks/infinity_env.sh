#!/usr/bin/env bash
# Create benchmarks/.venv-infinity: a venv of its own for infinity-emb, the existing
# classification server that benchmarks/infinity_bench.py times `hm3 serve` against. Apart from
# .venv because infinity-emb pins transformers 4.x and sentence-transformers.
# CPU torch goes in FIRST and a constraint keeps it (a plain `pip install torch` pulls the CUDA
# build); the `server,torch` extras only (`all` adds torchvision, built for the CUDA torch).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${INFINITY_VENV:-$here/.venv-infinity}"
python="${PYTHON:-python3}"
if [[ -x "$venv/bin/infinity_emb" ]]; then
    echo "infinity-emb venv ready: $venv"
    exit 0
fi
"$python" -m venv "$venv"
pip=("$venv/bin/pip" --disable-pip-version-check)
"${pip[@]}" install --quiet "torch==${TORCH_VERSION:-2.13.0}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
"${pip[@]}" install --quiet "infinity-emb[server,torch]==${INFINITY_VERSION:-0.0.78}" \
    --constraint "$constraints"
"$venv/bin/python" -c 'import torch; assert not torch.version.cuda, torch.__version__; print("torch", torch.__version__)'
echo "infinity-emb venv ready: $venv"
