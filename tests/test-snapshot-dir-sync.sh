#!/usr/bin/env bash
# nbdkit-snapshot
# A snapshot whose manifest is in place when syncing the store
# directory fails is kept, not undone: undoing it would delete the
# files the manifest on disk names, and the next start would refuse an
# incomplete store.  The failure is reported in the log; the store
# starts again with every view as it was.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version

fault=$abs_top_builddir/tests/.libs/libfault.so
[ -f $fault ] || fail "$fault not found (make check builds it)"

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
make_origin $origin 8M

LD_PRELOAD=$fault FAULT_MANIFEST_DIRSYNC=$tmp/trigger start_store
nbdsnap -c $store create s1
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"\x31" * 65536, 1 << 20); h.flush()'
save_export $sock snap/s1 $tmp/s1.img

# The directory sync after the manifest's rename fails for s2.
touch $tmp/trigger
nbdsnap -c $store create s2 ||
    fail "s2 was refused although its manifest is in place"
rm $tmp/trigger
grep -F "syncing the directory failed" $nbdkit_log
nbdsnap -c $store --json info s2 | jq -e '.checkpoint.kind == "snapshot"'
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"\x32" * 65536, 2 << 20); h.flush()'
save_export $sock snap/s2 $tmp/s2.img
save_export $sock "" $tmp/live.img
verify_views $sock $tmp/live.img s1 s2
stop_nbdkit $nbdkit_pid

# Without the fault: the store is whole.
start_store
verify_views $sock $tmp/live.img s1 s2
stop_nbdkit $nbdkit_pid
