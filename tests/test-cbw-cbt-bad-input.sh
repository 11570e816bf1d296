#!/usr/bin/env bash
# nbdkit-snapshot
# test-cbt-bad-input.sh with copy-before-write snapshots
# (SNAPSHOT_MODE, functions.sh.in).
SNAPSHOT_MODE=cbw
source "$(dirname "$0")/test-cbt-bad-input.sh"
