#!/usr/bin/env bash
# nbdkit-snapshot
# Bad input gets a clear error and loses nothing: bad filter
# parameters, bad snapshot names (at start-up and through nbdsnap),
# writes to a snapshot, unknown exports, a store that is in use, an
# origin of the wrong size and a block size that is not the store's.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdinfo --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
make_origin $origin 8M
origin_md5=$(md5 $origin)

# bad_params WANT ARGS...: nbdkit (in the foreground) with the filter
# on the file plugin and ARGS must exit with an error, saying WANT (a
# fixed string) on stderr.  Some errors can only be found once the
# server has started (in .after_fork), so this does not use --run:
# with --run, nbdkit 1.32 would run the command anyway.
bad_params ()
{
    local want="$1" pid i status=0
    shift
    rm -f $tmp/bad.pid
    if [ -S $tmp/bad.sock ]; then rm -f $tmp/bad.sock; fi
    nbdkit -f -P $tmp/bad.pid -U $tmp/bad.sock --filter=$FILTER \
           file $origin "$@" 2> $tmp/err &
    pid=$!
    cleanup_fn _stop_nbdkit $pid KILL
    for (( i = 0; i < patience; i++ )); do
        kill -0 $pid 2>/dev/null || break
        if nbdinfo --can connect "$(nbd_uri $tmp/bad.sock)" 2>/dev/null
        then
            _stop_nbdkit $pid
            fail "nbdkit accepted: $*"
        fi
        sleep 0.1
    done
    wait $pid || status=$?
    cat $tmp/err
    [ $status -ne 0 ] || fail "nbdkit exited with status 0: $*"
    grep -F -- "$want" $tmp/err ||
        fail "nbdkit $*: error does not say: $want"
}

# bad_daemon WANT ARGS...: the same, with nbdkit left to go into the
# background as it does by default.  An error it can find before it
# forks must reach stderr and the exit status; one it finds after
# would only reach syslog while nbdkit exits with 0.
bad_daemon ()
{
    local want="$1" status=0
    shift
    rm -f $tmp/daemon.pid
    if [ -S $tmp/daemon.sock ]; then rm -f $tmp/daemon.sock; fi
    nbdkit -P $tmp/daemon.pid -U $tmp/daemon.sock --filter=$FILTER \
           file $origin "$@" 2> $tmp/err || status=$?
    cat $tmp/err
    if [ $status -eq 0 ]; then
        # It went into the background: stop it, if it is still there.
        wait_for test -s $tmp/daemon.pid
        kill $(cat $tmp/daemon.pid) 2>/dev/null || true
        fail "nbdkit exited with status 0 and went into the background: $*"
    fi
    grep -F -- "$want" $tmp/err ||
        fail "nbdkit $*: error does not say: $want"
}

# good_params ARGS...: nbdkit with the filter and ARGS must start.
good_params ()
{
    start_nbdkit -P $tmp/good.pid -U $tmp/good.sock \
                 --filter=$FILTER file $origin "$@"
    stop_nbdkit $nbdkit_pid
}

# Missing or unusable store.
bad_params snapshot-store
bad_params snapshot-store snapshot-store=
bad_params $tmp/nosuchdir/store snapshot-store=$tmp/nosuchdir/store
touch $tmp/afile
bad_params $tmp/afile snapshot-store=$tmp/afile

# Block size: a power of two from 4K to 2M.
for v in 3000 1K 2K 4M 4194304 0 -64K abc 64Q ""; do
    bad_params snapshot-block-size \
               snapshot-store=$tmp/bs-store snapshot-block-size="$v"
done
good_params snapshot-store=$tmp/bs-4k snapshot-block-size=4K
good_params snapshot-store=$tmp/bs-2m snapshot-block-size=2M
good_params snapshot-store=$tmp/bs-64k snapshot-block-size=65536

# Job rate: bytes per second, 0 for no limit.
for v in abc -1M 64Q ""; do
    bad_params snapshot-job-rate \
               snapshot-store=$tmp/rate-store snapshot-job-rate="$v"
done
good_params snapshot-store=$tmp/rate-0 snapshot-job-rate=0
good_params snapshot-store=$tmp/rate-1g snapshot-job-rate=1G

# Control socket.
bad_params snapshot-control snapshot-store=$tmp/ctl-store snapshot-control=
bad_params $tmp/nosuchdir/ctl.sock \
           snapshot-store=$tmp/ctl-store snapshot-control=$tmp/nosuchdir/ctl.sock

# Mode: fixed when the store is created, refused on a store of the
# other kind (before nbdkit forks).
bad_params snapshot-mode snapshot-store=$tmp/mode-store snapshot-mode=xyz
bad_params snapshot-mode snapshot-store=$tmp/mode-store snapshot-mode=
good_params snapshot-store=$tmp/mode-store snapshot-mode=row
good_params snapshot-store=$tmp/mode-store
mismatch='snapshot-mode=cbw does not match the store'
bad_params "$mismatch" snapshot-store=$tmp/mode-store snapshot-mode=cbw
bad_daemon "$mismatch" snapshot-store=$tmp/mode-store snapshot-mode=cbw
good_params snapshot-store=$tmp/cbw-store snapshot-mode=cbw
good_params snapshot-store=$tmp/cbw-store
bad_params "snapshot-mode=row does not match the store" \
           snapshot-store=$tmp/cbw-store snapshot-mode=row

# Names at start-up: 1 to 64 of [A-Za-z0-9._-], not starting with
# "." or "-".
long64=$(printf 'a%.0s' {1..64})
long65=$(printf 'b%.0s' {1..65})
for name in ../x "" .x -x "a b" a/b "$long65" 'x"y' "é"; do
    bad_params snapshot-create snapshot-store=$tmp/name-store \
               snapshot-create="$name"
    grep -F "invalid name '$name'" $tmp/err ||
        fail "snapshot-create=$name: error does not say invalid name"
done
good_params snapshot-store=$tmp/name-store snapshot-create="$long64"
good_params snapshot-store=$tmp/name-store snapshot-create=A.b-c_9
# A name that exists already.
bad_params "A.b-c_9" snapshot-store=$tmp/name-store snapshot-create=A.b-c_9
grep -F "already exists" $tmp/err
bad_daemon "A.b-c_9" snapshot-store=$tmp/name-store snapshot-create=A.b-c_9
grep -F "already exists" $tmp/err
start_nbdkit -P $tmp/good.pid -U $tmp/good.sock \
             --filter=$FILTER file $origin snapshot-store=$tmp/name-store
nbdsnap -c $tmp/name-store --json list > $tmp/list.json
stop_nbdkit $nbdkit_pid
jq -e --arg l "$long64" '[.checkpoints[].name] == [$l, "A.b-c_9"]' \
   $tmp/list.json

# An unknown parameter is refused (by the plugin below), named.
bad_params snapshot-frobnicate snapshot-store=$tmp/x-store \
           snapshot-frobnicate=1

# None of that touched the origin.
[ "$(md5 $origin)" = "$origin_md5" ]

# Now a running server.
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store
pid=$nbdkit_pid
log=$nbdkit_log
nbdsnap -c $store create s1

# nbdsnap_fails WANT ARGS...: nbdsnap ARGS must exit 1 with nothing
# on stdout and WANT (a fixed string) on stderr.
nbdsnap_fails ()
{
    local want="$1" r=0
    shift
    nbdsnap "$@" > $tmp/out 2> $tmp/err || r=$?
    cat $tmp/out $tmp/err
    [ $r -eq 1 ] || fail "nbdsnap $*: exit status $r, expected 1"
    [ ! -s $tmp/out ] || fail "nbdsnap $*: wrote to stdout on error"
    grep -F -- "$want" $tmp/err ||
        fail "nbdsnap $*: error does not say: $want"
}

for name in ../x "" .x -x "a b" a/b "$long65" 'x"y'; do
    nbdsnap_fails "nbdsnap: create: invalid name '$name': " \
                  -c $store -- create "$name"
    # (info may say the name is invalid, or that there is no such
    # checkpoint.)
    nbdsnap_fails "nbdsnap: info: " -c $store -- info "$name"
done
nbdsnap_fails "nbdsnap: create: checkpoint 's1' already exists" \
              -c $store create s1
nbdsnap_fails "nbdsnap: info: no checkpoint named 'nosuch'" \
              -c $store info nosuch
nbdsnap -c $store create "$long64"
nbdsnap -c $store create x-
nbdsnap -c $store --json list > $tmp/list.json
jq -e --arg l "$long64" '[.checkpoints[].name] == ["s1", $l, "x-"]' \
   $tmp/list.json

# nbdsnap misuse.
nbdsnap_fails "" -c $store
nbdsnap_fails "" -c $store frobnicate
nbdsnap_fails "" -c $store info
nbdsnap_fails "" -c $store create
nbdsnap_fails "" -c $store create a b
nbdsnap_fails "" --no-such-option list
nbdsnap --help > $tmp/out
grep -w create $tmp/out
nbdsnap -V > $tmp/out
[ -s $tmp/out ]

# Writes to a snapshot fail with EPERM.
nbdsh -u "$(nbd_uri $sock snap/s1)" -c '
assert h.is_read_only()
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 4096, 0)
except nbd.Error as ex:
    assert ex.errno == "EPERM", ex
else:
    raise AssertionError("write to snap/s1 succeeded")
'
if nbdcopy -- $origin "$(nbd_uri $sock snap/s1)"; then
    fail "nbdcopy wrote to snap/s1"
fi
[ "$(export_md5 $sock snap/s1)" = "$origin_md5" ]

# Unknown exports are refused, and nbdkit says which.
for e in nosuch snap/nosuch snap/ snap/s1/x snap/../s1 s1; do
    if nbdinfo "$(nbd_uri $sock $e)" > /dev/null; then
        fail "export '$e' was served"
    fi
done
grep -F "unknown export 'nosuch'" $log
grep -F "snap/nosuch" $log

# A second nbdkit on the same store is refused, and the first goes on
# as before (its control socket too).
bad_params "is locked by another process" snapshot-store=$store
grep -F "$store" $tmp/err
bad_daemon "is locked by another process" snapshot-store=$store
nbdsnap -c $store --json list > $tmp/list.json
jq -e '.checkpoints | length == 3' $tmp/list.json
[ "$(export_md5 $sock snap/s1)" = "$origin_md5" ]
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"still here", 0)'
stop_nbdkit $pid

# An origin of another size is refused, naming both sizes.
cp $origin $tmp/bigger.img
truncate -s 9M $tmp/bigger.img
origin_saved=$origin
origin=$tmp/bigger.img
bad_params "origin size" snapshot-store=$store
grep -F 8388608 $tmp/err
grep -F 9437184 $tmp/err
origin=$origin_saved

# So is a block size that is not the store's (64K).
bad_params snapshot-block-size snapshot-store=$store snapshot-block-size=4K
bad_daemon snapshot-block-size snapshot-store=$store snapshot-block-size=4K

# The refusals lost nothing.
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store
[ "$(export_md5 $sock snap/s1)" = "$origin_md5" ]
nbdsh -u "$(nbd_uri $sock)" -c 'assert h.pread(10, 0) == b"still here"'
nbdsnap -c $store --json list > $tmp/list.json
jq -e '.checkpoints | length == 3' $tmp/list.json
[ "$(md5 $origin)" = "$origin_md5" ]
