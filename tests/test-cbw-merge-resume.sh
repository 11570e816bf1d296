#!/usr/bin/env bash
# nbdkit-snapshot
# test-merge-resume.sh with copy-before-write snapshots
# (SNAPSHOT_MODE, functions.sh.in).
SNAPSHOT_MODE=cbw
source "$(dirname "$0")/test-merge-resume.sh"
