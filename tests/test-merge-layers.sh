#!/usr/bin/env bash
# nbdkit-snapshot
# Jobs leave no layers that no snapshot separates (row stores): a
# delete by commit of the newest snapshot starts a new top layer for
# the writes made while it runs, and a revert starts one for the pages
# it copies back; each ends with one layer where no snapshot separates
# them, also when it is resumed after kill -9.  Jobs are held
# (-D snapshot.job_hold=1) so that the writes and the kill land inside
# them.  Every view reads as expected throughout, and the stopped store
# checks clean.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires jq --version
is_row || skip "row stores only"

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock

start ()
{
    start_store -D snapshot.job_hold=1
}

layers () { grep -c '^layer ' $store/manifest || true; }

# fill OFFSET-MIB BYTE [MIB]: write BYTE over MIB MiB (default 1), flush.
fill ()
{
    nbdsh -u "$(nbd_uri $sock)" -c "
h.pwrite(bytes([$2]) * ((${3:-1}) << 20), $1 << 20)
h.flush()
"
}

# expect EXPORT OFFSET-MIB BYTE: the MiB at OFFSET-MIB of EXPORT reads
# as BYTE.
expect ()
{
    nbdsh -u "$(nbd_uri $sock "$1")" -c "
got = h.pread(1 << 20, $2 << 20)
assert got == bytes([$3]) * (1 << 20), \"$1 at $2 MiB: not $3\"
"
}

# kill_inside JOB: let JOB take one step, kill -9 nbdkit while it is
# parked, restart, and let the resumed job finish.
kill_inside ()
{
    job_release $1 1
    wait_held $1 1
    stop_nbdkit $nbdkit_pid KILL
    grep -q "^job $1 " $store/manifest || fail "the journal lost job $1"
    start
    wait_held $1 0
    [ "$(last_job_field resumed)" = true ] || fail "job $1 did not resume"
    job_release $1
    nbdsnap -c $store wait
    [ "$(last_job_field state)" = done ] || fail "job $1 did not finish"
}

make_origin $origin 8M
start
fill 0 0x11 8
nbdsnap -c $store create s1
fill 0 0x22
nbdsnap -c $store create s2
fill 1 0x33 2
[ "$(layers)" -eq 2 ]

# Delete s2, the newest, by commit: its layer is the live top layer,
# so the job starts a new one, which takes the write made meanwhile.
nbdsnap -c $store delete s2 --strategy=commit
id=$(last_job_field id)
wait_held $id 0
[ "$(layers)" -eq 3 ]
fill 2 0x44
kill_inside $id
[ "$(layers)" -eq 1 ] || fail "$(layers) layers after the commit, not 1"
expect "" 0 0x22
expect "" 1 0x33
expect "" 2 0x44
expect "" 3 0x11
expect snap/s1 0 0x11
expect snap/s1 2 0x11
# The layer left takes writes.
fill 4 0x55
expect "" 4 0x55

# Revert to s1: the new top layer takes s1's pages back, and the layer
# below it is read by nothing once the job ends.
nbdsnap -c $store revert s1
id=$(last_job_field id)
wait_held $id 0
[ "$(layers)" -eq 2 ]
fill 5 0x66
kill_inside $id
[ "$(layers)" -eq 1 ] || fail "$(layers) layers after the revert, not 1"
for mib in 0 1 2 3 4 6 7; do
    expect "" $mib 0x11
    expect snap/s1 $mib 0x11
done
expect "" 5 0x66
expect snap/s1 5 0x11

# A snapshot and a delete by commit once more, without a kill.
nbdsnap -c $store create s3
fill 6 0x77
nbdsnap -c $store delete s3 --strategy=commit
id=$(last_job_field id)
wait_held $id 0
fill 7 0x88
job_release $id
nbdsnap -c $store wait
[ "$(layers)" -eq 1 ] || fail "$(layers) layers after the commit, not 1"
expect "" 6 0x77
expect "" 7 0x88
expect snap/s1 7 0x11

stop_nbdkit $nbdkit_pid
check_clean $store
start
expect "" 7 0x88
expect snap/s1 7 0x11
