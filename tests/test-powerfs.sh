#!/usr/bin/env bash
# nbdkit-snapshot
# powerfs (tests/powerfs/powerfs.c), the file system the soak's
# power-loss mode runs on: after a crash it holds exactly what was
# synced (file data by fsync, fdatasync, O_DSYNC and msync of a shared
# mapping; names by fsync of their directory), or with torn writeback
# each unsynced page whole, old or new.  See powerfs/test-powerfs.py.

source ./functions.sh
set -e
set -x

requires_powerfs

python3 "$abs_top_srcdir/tests/powerfs/test-powerfs.py" "$powerfs" "$tmp"
