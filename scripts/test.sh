#!/usr/bin/env bash
# The full test suite: what CI runs (.ci/run calls exactly this).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cd "$root"

bash "$here/setup.sh" --tests

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "examples are valid and canonical"
kiln="${CARGO_TARGET_DIR:-$root/target}/release/kiln"
"$kiln" validate examples/*.yaml
for f in examples/*.yaml; do "$kiln" fmt --check "$f"; done

step "tests"
if command -v cargo-nextest >/dev/null; then
  junit="$root/target/nextest/default/junit.xml"
  rm -f "$junit"
  set +e
  cargo nextest run --workspace --release --no-fail-fast
  rc=$?
  set -e
  # A test that needs something absent returns early after printing `SKIP: <reason>`; list
  # them so that no skip passes silently.
  if [ -f "$junit" ]; then
    skips=$(grep -ao 'SKIP:[^<&]*' "$junit" | sort -u || true)
    if [ -n "$skips" ]; then
      step "tests that skipped part or all of their checks at run time"
      printf '%s\n' "$skips"
    fi
  fi
  [ "$rc" -eq 0 ] || exit "$rc"
else
  cargo test --workspace --release --no-fail-fast
fi

step "browser tests (kiln serve, headless Chromium)"
if command -v npm >/dev/null && command -v node >/dev/null; then
  # playwright-core only drives the Debian chromium from scripts/packages.txt; no browser download.
  (cd builder/web && npm ci --no-audit --no-fund --loglevel=error)
  # The YAML editor's schema lookup, cursor paths and comment-keeping patch (no browser needed).
  KILN_BIN="$kiln" node --test builder/web/tests/yaml.test.mjs
  # Screenshots of each page are the run's artefacts (README links the copies in web/screenshots).
  mkdir -p "$root/target/screenshots"
  KILN_SCREENSHOTS="$root/target/screenshots" node builder/web/tests/run.mjs "$kiln"
else
  echo "SKIP: node/npm not found; the browser tests of kiln serve did not run" >&2
fi
