#!/usr/bin/env bash
# nbdkit-snapshot
# delete --output=FILE names the merged image whichever way the merge
# runs: with few blocks changed, auto commits them into the origin and
# FILE becomes a second name of the origin's file; with most changed,
# auto streams the origin into the layer and FILE names the layer.
# Either way FILE reads as the live volume, and nbdsnap says which way
# ran and what FILE is.  With a plugin other than file the filter
# cannot name the origin: a commit with --output is refused before
# anything is copied, and auto streams.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

sock=$tmp/nbd.sock

# changed PERCENT: write PERCENT of the 64K blocks of the live volume.
changed ()
{
    nbdsh -u "$(nbd_uri $sock)" -c "
import random
rng = random.Random($1)
n = h.get_size() // 65536
for b in rng.sample(range(n), n * $1 // 100):
    h.pwrite(bytes([b % 251 + 1]) * 65536, b * 65536)
h.flush()
"
}

# run PERCENT WANT-STRATEGY: a fresh store over a fresh origin, a
# snapshot, PERCENT changed, then delete with --output.
run ()
{
    local pct=$1 want=$2 out=$tmp/final-$1.img
    origin=$tmp/origin-$1.img
    store=$tmp/store-$1
    make_origin $origin 16M
    start_store
    nbdsnap -c $store create s1
    changed $pct
    save_export $sock "" $tmp/live-$pct.img
    nbdsnap -c $store delete s1 --output=$out --wait > $tmp/out
    cat $tmp/out
    grep "^deleting snapshot 's1' by $want: " $tmp/out
    grep -F "$out will name the merged image" $tmp/out
    [ "$(md5 $out)" = "$(md5 $tmp/live-$pct.img)" ] ||
        fail "$pct%: $out is not the live volume"
    [ "$(export_md5 $sock)" = "$(md5 $tmp/live-$pct.img)" ] ||
        fail "$pct%: the live volume changed"
    stop_nbdkit $nbdkit_pid
    # Still the live volume after the server is gone.
    [ "$(md5 $out)" = "$(md5 $tmp/live-$pct.img)" ] ||
        fail "$pct%: $out changed after the stop"
}

# 5% changed: commit into the origin, and FILE is the origin's file.
run 5 commit
grep -F "a hard link to the origin's file" $tmp/out
[ "$(stat -c %d:%i $tmp/final-5.img)" = "$(stat -c %d:%i $origin)" ] ||
    fail "after a commit, $tmp/final-5.img is not the origin's file"

# 95% changed: stream, and FILE is the store's merged layer.
run 95 stream
grep -F "a hard link to the store's merged layer" $tmp/out
layer=$(ls $store/layer-*.data)
[ -L "$layer" ] && [ "$(readlink "$layer")" = $tmp/final-95.img ] ||
    fail "after a stream, $layer is not a link to the final image"

# A plugin other than file: the filter cannot name the origin.
store=$tmp/mem-store
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER memory size=16M snapshot-store=$store
nbdsnap -c $store create s1
changed 5
save_export $sock "" $tmp/mem-live.img
if nbdsnap -c $store delete s1 --strategy=commit --output=$tmp/mem.img \
       2> $tmp/err; then
    fail "a commit with --output over the memory plugin was accepted"
fi
cat $tmp/err
grep -F "the filter does not know it" $tmp/err
[ ! -e $tmp/mem.img ] || fail "a refused --output created the file"
nbdsnap -c $store --json jobs | jq -e '.jobs == []'
# auto: a stream can name its result.
nbdsnap -c $store delete s1 --output=$tmp/mem.img --wait > $tmp/out
cat $tmp/out
grep "^deleting snapshot 's1' by stream: " $tmp/out
[ "$(md5 $tmp/mem.img)" = "$(md5 $tmp/mem-live.img)" ] ||
    fail "memory plugin: $tmp/mem.img is not the live volume"
stop_nbdkit $nbdkit_pid
