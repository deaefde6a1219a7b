#!/usr/bin/env bash
# kiln's main job on a fresh machine: install what is needed, build kiln, build
# examples/hello.yaml and show the module it made.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cd "$root"

bash "$here/setup.sh"
kiln="${CARGO_TARGET_DIR:-$root/target}/release/kiln"
# --force: a second run rebuilds the example instead of stopping at the module it made.
"$kiln" build examples/hello.yaml --output modules --force
"$kiln" ls --modules modules
