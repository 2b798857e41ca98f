#!/usr/bin/env bash
# Make .venv (once), install condiquant with its test and deploy (ONNX Runtime) extras, and fetch data/weights from the asset mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,deploy]"
.venv/bin/python scripts/fetch_assets.py
