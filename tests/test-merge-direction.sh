#!/usr/bin/env bash
# nbdkit-snapshot
# Which way a merge goes.  A 32M volume, 64K blocks, one snapshot s1,
# then whole blocks rewritten (seeded random choice of blocks):
#   A. 5% of the blocks: deleting s1 with auto commits (commit moves
#      the changed blocks, stream the others, and says so);
#   B. 95%: auto streams, here with --output=FILE.
# Each case runs again on an identical fresh setup with the other
# strategy given explicitly: both give the same live volume, the
# expected image.  A commit writes the origin (which then is the
# image); a stream never writes it and retires it: after the stream
# the origin can be scribbled over and the live volume does not
# change.  FILE is the image once nbdkit has stopped (qemu-img compare,
# and served by nbdkit file).

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires qemu-img --version
requires jq --version

bs=65536
size=$((32 * 1024 * 1024))
nblocks=$((size / bs))
make_origin $tmp/origin0.img 32M

# start DIR: nbdkit on DIR/origin.img and the store DIR/store.
start ()
{
    start_nbdkit -P $1/nbdkit.pid -U $1/nbd.sock \
                 --filter=$FILTER file $1/origin.img \
                 snapshot-store=$1/store snapshot-block-size=$bs
}

# setup DIR PERCENT: a fresh copy of the origin and a fresh store in
# DIR, snapshot s1, then PERCENT% of the blocks rewritten (the same
# blocks and data for the same PERCENT).  DIR/expected.img is the
# live volume as it must read.  Sets changed (the number of blocks).
setup ()
{
    local dir=$1
    mkdir $dir
    cp $tmp/origin0.img $dir/origin.img
    cp $tmp/origin0.img $dir/expected.img
    start $dir
    nbdsnap -c $dir/store create s1
    changed=$((nblocks * $2 / 100))
    REF=$dir/expected.img nbdsh -u "$(nbd_uri $dir/nbd.sock)" \
        -c "$ref_ops" -c "
import random
rng = random.Random($2)
for b in sorted(rng.sample(range($nblocks), $changed)):
    w(rng.randbytes($bs), b * $bs)
h.flush()
"
    cmp -s $dir/expected.img $tmp/origin0.img &&
        fail "setup $2%: nothing changed"
    [ "$(export_md5 $dir/nbd.sock)" = "$(md5 $dir/expected.img)" ] ||
        fail "setup $2%: the live volume is not as written"
    return 0
}

# merge DIR NBDSNAP-DELETE-OPTIONS...: delete s1, check the reply's
# costs, wait for the job and check it; the live volume is then the
# expected image.  Sets strategy (as the reply said).
merge ()
{
    local dir=$1 id
    shift
    nbdsnap -c $dir/store --json delete s1 "$@" > $dir/reply.json
    cat $dir/reply.json
    # Commit moves the changed blocks; stream the others.
    jq -e --argjson c $((changed * bs)) --argjson s $((size - changed * bs)) \
       '.job.commit_bytes == $c and .job.stream_bytes == $s' $dir/reply.json ||
        fail "the costs are not $((changed * bs)) and" \
             "$((size - changed * bs)) bytes"
    strategy=$(jq -r .job.strategy $dir/reply.json)
    id=$(jq .job.id $dir/reply.json)
    nbdsnap -c $dir/store wait $id
    nbdsnap -c $dir/store --json jobs > $dir/jobs.json
    jq -e --argjson id $id '
        .jobs[] | select(.id == $id) | .state == "done" and
        .bytes_done == .bytes_total and .error == null' $dir/jobs.json
    nbdsnap -c $dir/store --json list |
        jq -e '.checkpoints == []'
    [ "$(export_md5 $dir/nbd.sock)" = "$(md5 $dir/expected.img)" ] ||
        fail "$dir: after the $strategy the live volume is not as expected"
    case $strategy in
        commit)
            cmp $dir/origin.img $dir/expected.img ||
                fail "$dir: the commit did not leave the image in the origin" ;;
        stream)
            cmp $dir/origin.img $tmp/origin0.img ||
                fail "$dir: the stream wrote the origin" ;;
        *) fail "strategy '$strategy'" ;;
    esac
}

# A: few changes.  Auto commits.
setup $tmp/a-auto 5
merge $tmp/a-auto
[ "$strategy" = commit ] || fail "5%: auto chose $strategy"
jq -e '.job.commit_bytes < .job.stream_bytes' $tmp/a-auto/reply.json
sum_a=$(md5 $tmp/a-auto/expected.img)
stop_nbdkit $nbdkit_pid

setup $tmp/a-stream 5
merge $tmp/a-stream --strategy=stream
[ "$strategy" = stream ]
[ "$(md5 $tmp/a-stream/expected.img)" = "$sum_a" ] ||
    fail "5%: the two setups differ"
[ "$(export_md5 $tmp/a-stream/nbd.sock)" = "$sum_a" ] ||
    fail "5%: stream and commit give different volumes"
stop_nbdkit $nbdkit_pid

# B: many changes.  Auto streams, naming the final image.
out=$tmp/b-auto/final.img
setup $tmp/b-auto 95
merge $tmp/b-auto --output=$out
[ "$strategy" = stream ] || fail "95%: auto chose $strategy"
jq -e --arg o $out '.job.stream_bytes < .job.commit_bytes and
                    .job.output == $o' $tmp/b-auto/reply.json
sum_b=$(md5 $tmp/b-auto/expected.img)
# The origin is retired: scribbling over it changes nothing.
python3 -c '
import os, sys
f = os.open(sys.argv[1], os.O_WRONLY)
for off in range(0, int(sys.argv[2]), 1 << 20):
    os.pwrite(f, b"\xee" * 4096, off)
os.fsync(f)
' $tmp/b-auto/origin.img $size
[ "$(export_md5 $tmp/b-auto/nbd.sock)" = "$sum_b" ] ||
    fail "95%: the live volume still reads the origin after the stream"
stop_nbdkit $nbdkit_pid
# FILE is the final image, a plain file.
[ -f $out ] && [ ! -L $out ] || fail "$out is not a regular file"
[ "$(stat -c %s $out)" -eq $size ] || fail "$out has the wrong size"
qemu-img compare -f raw -F raw $out $tmp/b-auto/expected.img
[ "$(nbdkit -U - file $out --run 'nbdcopy "$uri" - | md5sum' |
     cut -d' ' -f1)" = "$sum_b" ] ||
    fail "$out served by nbdkit file is not the image"
# And the store still works on it, with the origin scribbled over.
start $tmp/b-auto
[ "$(export_md5 $tmp/b-auto/nbd.sock)" = "$sum_b" ] ||
    fail "95%: after a restart the live volume is not the image"
# A later merge that drops FILE's layer from the store (a stream of
# the next snapshot copies into the newer layer) deletes the store's
# symlink, never FILE or its data.
link=$(find $tmp/b-auto/store -maxdepth 1 -type l -lname $out)
[ -n "$link" ] || fail "no symlink to $out in the store"
nbdsnap -c $tmp/b-auto/store create s2
nbdsh -u "$(nbd_uri $tmp/b-auto/nbd.sock)" \
      -c 'h.pwrite(b"\x5a" * 65536, 0); h.flush()'
nbdsnap -c $tmp/b-auto/store delete s2 --strategy=stream --wait
wait_for test ! -L $link
stop_nbdkit $nbdkit_pid
[ -f $out ] && [ ! -L $out ] || fail "$out is gone after its layer was dropped"
[ "$(md5 $out)" = "$sum_b" ] ||
    fail "$out changed when the store dropped its layer"

setup $tmp/b-commit 95
merge $tmp/b-commit --strategy=commit
[ "$strategy" = commit ]
[ "$(md5 $tmp/b-commit/expected.img)" = "$sum_b" ] ||
    fail "95%: the two setups differ"
[ "$(export_md5 $tmp/b-commit/nbd.sock)" = "$sum_b" ] ||
    fail "95%: stream and commit give different volumes"
stop_nbdkit $nbdkit_pid
