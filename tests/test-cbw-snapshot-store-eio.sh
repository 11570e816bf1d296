#!/usr/bin/env bash
# nbdkit-snapshot
# test-snapshot-store-eio.sh with copy-before-write snapshots
# (SNAPSHOT_MODE, functions.sh.in).
SNAPSHOT_MODE=cbw
source "$(dirname "$0")/test-snapshot-store-eio.sh"
