#!/usr/bin/env bash
# The main job: install what is missing, build (Release), train the DLRM on the
# embedded default dataset, print AUC / NE beside the planted optimum, and save a
# checkpoint, metrics and a report under runs/default/. Extra arguments go to
# `ember train` (see build/ember train --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh build
exec build/ember train "$@"
