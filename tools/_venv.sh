# Sourced by tools/test.sh and tools/demo.sh: create .venv if missing and install the project.
# torch/torchvision pinned to the builds available offline on this machine (see README).
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
