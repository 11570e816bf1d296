#!/usr/bin/env bash
# nbdkit-snapshot
# test-snapshot-origin-eio.sh with copy-before-write snapshots
# (SNAPSHOT_MODE, functions.sh.in).
SNAPSHOT_MODE=cbw
source "$(dirname "$0")/test-snapshot-origin-eio.sh"
