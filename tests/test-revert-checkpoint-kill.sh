#!/usr/bin/env bash
# nbdkit-snapshot
# A checkpoint taken while a revert runs makes the writes acknowledged
# before it durable, as a flush does: after kill -9 and a restart, the
# resumed revert does not copy the snapshot's pages back over them, and
# the live volume reads them (guarantees 1 and 3).  The revert is slowed
# down (-D snapshot.job_delay) so that the kill lands while it runs and
# the page written is one it has not reached yet.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock

start ()
{
    start_store -D snapshot.job_delay=500000
}

make_origin $origin 8M
start
nbdsnap -c $store create s1
nbdsh -u "$(nbd_uri $sock)" -c '
for off in range(0, h.get_size(), 1 << 20):
    h.pwrite(b"\xaa" * (1 << 20), off)
h.flush()
'
nbdsnap -c $store revert s1
[ "$(last_job_field state)" = running ] || fail "the revert ended too soon"

# The last MiB, which the revert reaches last; no flush, no FUA.
nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\xbb" * 65536, h.get_size() - 65536)
'
nbdsnap -c $store create b1 --bitmap-only
[ "$(last_job_field state)" = running ] || fail "the revert ended too soon"
stop_nbdkit $nbdkit_pid KILL
start

nbdsh -u "$(nbd_uri $sock)" -c '
got = h.pread(65536, h.get_size() - 65536)
assert got == b"\xbb" * 65536, "the write before the checkpoint was lost"
'
nbdsnap -c $store wait
nbdsnap -c $store --json jobs > $tmp/jobs.json
jq -e '.jobs[-1].state == "done" and .jobs[-1].resumed' $tmp/jobs.json
nbdsh -u "$(nbd_uri $sock)" -c '
got = h.pread(65536, h.get_size() - 65536)
assert got == b"\xbb" * 65536, "the resumed revert copied over the write"
'
