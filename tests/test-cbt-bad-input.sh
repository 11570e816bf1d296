#!/usr/bin/env bash
# nbdkit-snapshot
# Checkpoints and dirty/ exports refuse bad input with clear errors
# and lose nothing: bad names, unknown checkpoints, FROM/TO reversed,
# a bitmap-only TO, snap/ of a bitmap-only checkpoint, deleting an
# unknown checkpoint or a snapshot, and deleting a checkpoint that an
# open dirty/ export uses (refused while it is connected).

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdinfo --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock

make_origin $origin 8M
start_nbdkit -P $tmp/nbdkit.pid -U $sock -v \
             --filter=$FILTER file $origin snapshot-store=$store

nbdsnap -c $store create a --bitmap-only
nbdsnap -c $store create s1
nbdsnap -c $store create b --bitmap-only
nbdsnap -c $store create s2

# expect_refused EXPORT MESSAGE: connecting fails; the log says why.
expect_refused ()
{
    if nbdinfo "$(nbd_uri $sock "$1")" > $tmp/out 2>&1; then
        fail "export '$1' was accepted"
    fi
    grep -F -- "$2" $nbdkit_log || fail "no '$2' in the log for '$1'"
}
expect_refused dirty/nosuch "no checkpoint named 'nosuch'"
expect_refused dirty/a/nosuch "no checkpoint named 'nosuch'"
expect_refused dirty/s2/s1 "'s1' is older than 's2'"
expect_refused dirty/a/b "'b' is a bitmap-only checkpoint"
expect_refused snap/a "'a' is a bitmap-only checkpoint"
expect_refused 'dirty/..' "invalid name '..'"
expect_refused 'dirty/' "invalid name ''"
expect_refused 'dirty/a/s1/x' "invalid name 's1/x'"
# FROM bitmap-only and newer than TO: no swapped export is suggested,
# since none would be served.
expect_refused dirty/b/s1 "'b' is a bitmap-only checkpoint, which cannot end a range: use dirty/s1"
if grep -F "use dirty/s1/b" $nbdkit_log; then
    fail "the log suggests dirty/s1/b, which is refused"
fi
# Names with control characters or bytes that are not ASCII go to the
# log escaped, and never raw.
python3 - $sock <<'PYEOF'
import nbd, sys
for name in ["snap/a\nforged log line", "dirty/\xe9t\xe9", "x" * 300]:
    h = nbd.NBD()
    h.set_export_name(name)
    try:
        h.connect_unix(sys.argv[1])
    except nbd.Error:
        pass
    else:
        sys.exit("export %r was accepted" % name)
PYEOF
grep -F "unknown export 'snap/a\x0aforged log line'" $nbdkit_log
grep -F "unknown export 'dirty/\xc3\xa9t\xc3\xa9'" $nbdkit_log
grep -F "unknown export 'xxxxxxxxxx" $nbdkit_log | grep -F "...'"
# (nbdkit's own debug lines, with -v, show export names raw.)
if grep -F "forged log line': " $nbdkit_log | grep -v "x0a"; then
    fail "a raw newline from an export name reached the filter's errors"
fi

# expect_error MESSAGE NBDSNAP-ARGS...: exit 1 and the message.
expect_error ()
{
    local msg="$1" status=0
    shift
    nbdsnap -c $store "$@" > $tmp/out 2> $tmp/err || status=$?
    cat $tmp/err
    [ "$status" -eq 1 ] || fail "nbdsnap $*: exit status $status"
    [ ! -s $tmp/out ] || fail "nbdsnap $*: printed to stdout on error"
    grep -F -- "$msg" $tmp/err || fail "nbdsnap $*: no '$msg'"
}
expect_error "invalid name '../x'" create ../x --bitmap-only
expect_error "invalid name ''" create '' --bitmap-only
expect_error "checkpoint 'a' already exists" create a --bitmap-only
expect_error "checkpoint 's1' already exists" create s1 --bitmap-only
expect_error "no checkpoint named 'zz'" delete zz
expect_error "no checkpoint named 'zz'" info zz
expect_error "'a' is a bitmap-only checkpoint: it has no data to merge" delete a --strategy=commit

# Deleting a checkpoint that a dirty/ export is reading is refused
# while the connection is open, then works.
mkfifo $tmp/go
nbdsh -u "$(nbd_uri $sock dirty/b)" -c "
h.pread(4096, 0)
open('$tmp/ready', 'w').close()
open('$tmp/go').read()
h.pread(4096, 0)
" &
reader=$!
cleanup_fn kill $reader
wait_for test -e $tmp/ready
nbdsnap -c $store --json info b | jq -e '.checkpoint.connections == 1'
nbdsnap -c $store info b | grep -Fx 'connections: 1'
expect_error "checkpoint 'b' is in use by 1 connection" delete b
# A delete gives connections a moment to close (control.c,
# wait_unused): started while the reader is still connected, it waits
# (the debug log says so), and succeeds once the reader has gone.
waits () { grep -c "delete 'b': waiting up to" $nbdkit_log || :; }
waits0=$(waits)
more_waits () { [ "$(waits)" -gt "$waits0" ]; }
nbdsnap -c $store delete b &
deleter=$!
wait_for more_waits
echo > $tmp/go
wait $reader
wait $deleter
nbdsnap -c $store --json list > $tmp/list.json
jq -e '[.checkpoints[].name] == ["a", "s1", "s2"]' $tmp/list.json

# Nothing was lost: the blocks written while b existed still count
# as changed since a (b's bits were folded into s1's map).
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"1" * 512, 0)'
nbdsnap -c $store create b2 --bitmap-only
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"2" * 512, 65536 * 9)'
nbdsnap -c $store delete b2
nbdsnap -c $store --json info s2 > $tmp/s2.json
jq -e '.checkpoint.changed_blocks == 2' $tmp/s2.json

# Restart: the same checkpoints answer the same.
stop_nbdkit $nbdkit_pid
start_nbdkit -P $tmp/nbdkit.pid -U $sock -v \
             --filter=$FILTER file $origin snapshot-store=$store
nbdsnap -c $store --json info s2 > $tmp/s2b.json
jq -e '.checkpoint.changed_blocks == 2' $tmp/s2b.json
nbdsnap -c $store --json list | jq -e '[.checkpoints[].name] == ["a", "s1", "s2"]'
