#!/usr/bin/env bash
# vendor/hyper is crates.io's hyper 1.12.0 plus exactly vendor/hyper/imagegate.patch: with the
# patch taken off, its sources hash to the published crate's (vendor/hyper/IMAGEGATE-PATCH.md).
# Run by .ci/run, so the fork cannot drift from what the patch file says.
set -euo pipefail
cd "$(dirname "$0")/.."
# The published crate's sources: in its src/, `find src -type f | LC_ALL=C sort | xargs sha256sum | sha256sum`.
published=e6e42302e0336006ae6df309cf8e18f5574839977468fc2a7fa8f6bc7af9b567
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r vendor/hyper/src "$tmp/src"
(cd "$tmp" && git apply -R -p1 "$OLDPWD/vendor/hyper/imagegate.patch")
got=$(cd "$tmp" && find src -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ "$got" != "$published" ]; then
  echo "vendor/hyper/src minus imagegate.patch is not crates.io's hyper 1.12.0 ($got)" >&2
  exit 1
fi
echo "vendor/hyper: crates.io's hyper 1.12.0 plus imagegate.patch"
