#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment outside the source tree, and use it
# as a user would: prune-recipe --version, list, validate a bundled recipe, run a tiny recipe.
# Everything lives in a temporary folder that is removed at the end. Usage: tools/wheel_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
PY=${PYTHON:-python3}
TMP=$(mktemp -d -t icnn-wheel-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
pip_quiet() {  # pip, without the warnings about local index folders this machine does not have
  "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2)
}
pip_quiet "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$TMP/dist" "$SRC"
"$PY" -m venv "$TMP/venv"
pip_quiet "$TMP/venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
pip_quiet "$TMP/venv/bin/python" -m pip install -q --disable-pip-version-check "$TMP"/dist/icnn_compress-*.whl
cd "$TMP"  # nothing of the source tree is importable from here
cat > tiny.yaml <<'EOF'
name: tiny
data: {name: synthetic-parts, num_classes: 3, image_size: 16, train_size: 96, val_size: 48, batch_size: 32}
model: {name: resnet_cifar8, in_channels: 3}
icnn: {layers: [layer3], warmup_steps: 2}
finetune: {epochs: 1, lr: 0.05}
analysis: {probe_images: 32, pictures: false}
prune: {criterion: l1, macs_reduction: 1.5, round_to: null, step_ratio: 0.1, bn_batches: 2}
recover: {epochs: 1}
measure: {batch_sizes: [1], threads: 1, provider: cpu, repeats: 2}
EOF
PR="$TMP/venv/bin/prune-recipe"
"$TMP/venv/bin/python" - <<'EOF'
import icnn_compress, pathlib, sys
where = pathlib.Path(icnn_compress.__file__).resolve()
assert "site-packages" in where.parts, f"icnn_compress imported from {where}, not the installed wheel"
print(f"installed: {where.parent}")
EOF
"$PR" --version
"$PR" list | tee list.txt
grep -q '^quickstart ' list.txt
"$PR" validate quickstart
"$PR" run tiny.yaml --out run --quiet
test -f run/8_report/report.html
echo "wheel check: ok"
