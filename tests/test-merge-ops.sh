#!/usr/bin/env bash
# nbdkit-snapshot
# Merge jobs against a model.  Four snapshots s1..s4 with seeded
# random writes (unaligned, across block edges, zeroing, trimming,
# blocks made all zeros) before each and after the last; a saved copy
# of each snapshot and of the live volume.  Then delete the oldest by
# commit (into the origin), a middle one by auto with --keep-bitmap,
# the newest by stream; after each job every remaining snap/ view and
# the live volume read as saved (checksums, and qemu-img compare),
# the job is done with bytes_done == bytes_total, and the checkpoints
# and dirty/ maps say what they should.  Then revert: the live volume
# reads as the snapshot as soon as the command returns, while the job
# still runs; writes during and after it land on top; other snapshots
# stay as they were.  Restarts in between and at the end: every view
# reads the same again.  In cbw mode each delete moves the blocks the
# snapshot kept into the next older one (the oldest's just go), and
# the origin is the live volume throughout.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires qemu-img --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
bs=65536
REF=$tmp/ref.img                # the live volume, as it must read
export REF

# start [NBDKIT-OPTIONS...]
start ()
{
    start_nbdkit -P $tmp/nbdkit.pid -U $sock "$@" \
                 --filter=$FILTER file $origin snapshot-store=$store \
                 snapshot-block-size=$bs
}

# scribble SEED: 40 random operations on the live volume, applied to
# $REF too; the blocks they touch are written to $tmp/touched-SEED.
cat > $tmp/scribble.py <<'EOF'
import os, random
seed = int(os.environ["SEED"])
rng = random.Random(seed)
size = h.get_size()
bs = int(os.environ["BS"])
touched = set()
for i in range(40):
    op = rng.choice(["w", "w", "edge", "blocks", "zero", "trim", "zdata"])
    if op == "w":
        n = rng.randint(1, 200000)
        off = rng.randrange(0, size - n + 1)
        w(rng.randbytes(n), off)
    elif op == "edge":
        # Across a block edge, unaligned on both sides.
        n = rng.randint(2, 9000)
        off = rng.randrange(1, size // bs) * bs - rng.randint(1, n - 1)
        w(rng.randbytes(n), off)
    elif op == "blocks":
        k = rng.randint(1, 4)
        off = rng.randrange(0, size // bs - k + 1) * bs
        n = k * bs
        w(rng.randbytes(n), off)
    elif op == "zero":
        n = rng.randint(1, 300000)
        off = rng.randrange(0, size - n + 1)
        z(n, off)
    elif op == "trim":
        n = rng.randint(4096, 300000)
        off = rng.randrange(0, size - n + 1)
        t(n, off)
    else:
        # Data that makes a whole block all zeros (sent as a write).
        off = rng.randrange(0, size // bs) * bs
        n = bs
        w(bytes(n), off)
    touched.update(range(off // bs, (off + n - 1) // bs + 1))
    check(off, n)
h.flush()
with open(os.environ["TMPDIR_T"] + "/touched-%d" % seed, "w") as f:
    f.write("".join("%d\n" % b for b in sorted(touched)))
EOF
scribble ()
{
    SEED=$1 BS=$bs TMPDIR_T=$tmp \
        nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" \
              -c "exec(open('$tmp/scribble.py').read())"
}

# touched SEED...: the union of the blocks those rounds touched.
touched ()
{
    local s
    for s in "$@"; do cat $tmp/touched-$s; done | sort -n -u
}

# dirty_blocks EXPORT: the blocks its base:allocation reports as
# changed (data), one a line.
dirty_blocks ()
{
    nbdinfo --map --json "$(nbd_uri $sock "$1")" |
        jq -r --argjson bs $bs \
           '.[] | select(.type == 0) |
            range(.offset / $bs; (.offset + .length) / $bs)' |
        sort -n -u
}

# check_dirty EXPORT SEED...: EXPORT reports every block those rounds
# touched as changed (it may report more: a block may be marked that
# did not change, never the reverse).  What it reported is kept for
# same_dirty.
check_dirty ()
{
    local e=$1
    shift
    dirty_blocks $e > $tmp/dirty-${e//\//_}
    touched "$@" > $tmp/want-blocks
    [ -s $tmp/want-blocks ] || fail "no blocks touched by rounds $*"
    comm -23 <(sort $tmp/want-blocks) <(sort $tmp/dirty-${e//\//_}) \
         > $tmp/missing
    [ ! -s $tmp/missing ] ||
        fail "$e lacks blocks that rounds $* touched:" $(head $tmp/missing)
}

# same_dirty EXPORT: EXPORT reports the same blocks as at its last
# check_dirty (a merge moves data, not changes).
same_dirty ()
{
    dirty_blocks $1 > $tmp/got-blocks
    cmp $tmp/dirty-${1//\//_} $tmp/got-blocks ||
        fail "$1 reports other blocks than before:" \
             $(diff $tmp/dirty-${1//\//_} $tmp/got-blocks | grep '^[<>]' | head)
}

# verify NAME...: each snap/NAME reads as $tmp/NAME.img, and the live
# volume as $REF.
verify ()
{
    verify_views $sock $REF "$@"
}

# checkpoints: "name:kind" of every checkpoint, oldest first.
checkpoints ()
{
    nbdsnap -c $store --json list |
        jq -r '[.checkpoints[] | "\(.name):\(.kind)"] | join(" ")'
}

# layers: the number of layer data files in the store.
layers ()
{
    local f n=0
    for f in $store/layer-*.data; do
        [ -e "$f" ] && n=$((n + 1))
    done
    echo $n
}

# layers_are N: the store holds N layer data files (a merged layer's
# files are deleted just after its job is reported done).
layers_are ()
{
    [ "$(layers)" -eq "$1" ]
}

# job_done ID: job ID is done, with no error and every byte moved;
# a delete moved what it said it would.
job_done ()
{
    nbdsnap -c $store --json jobs > $tmp/jobs.json
    cat $tmp/jobs.json
    jq -e --argjson id $1 '
        [.jobs[] | select(.id == $id)] | length == 1 and
        (.[0] | .state == "done" and .error == null and
                .bytes_done == .bytes_total and
                (if .kind == "delete" then
                   .bytes_total == (if .strategy == "commit"
                                    then .commit_bytes
                                    elif .strategy == "stream"
                                    then .stream_bytes
                                    else .move_bytes end)
                 else true end))' $tmp/jobs.json ||
        fail "job $1 is not done with bytes_done == bytes_total"
}

# delete NAME OPTIONS...: start deleting NAME, check the reply, and
# wait for the job.  Sets strategy (as the reply said).  Every other
# call waits with delete --wait, whose one JSON object is the job as
# it ended.
ndeletes=0
delete ()
{
    local name=$1 id
    shift
    ndeletes=$((ndeletes + 1))
    if [ $((ndeletes % 2)) -eq 0 ]; then
        nbdsnap -c $store --json delete $name "$@" --wait > $tmp/reply.json
        cat $tmp/reply.json
        [ "$(wc -l < $tmp/reply.json)" -eq 1 ]
        jq -e '.job.state == "done" and
               .job.bytes_done == .job.bytes_total' $tmp/reply.json
    else
        nbdsnap -c $store --json delete $name "$@" > $tmp/reply.json
        cat $tmp/reply.json
    fi
    jq -e --arg n $name --arg m $snapshot_mode '
        .job.kind == "delete" and .job.name == $n and
        (if $m == "cbw" then .job.strategy == "move"
         else .job.strategy == "commit" or .job.strategy == "stream"
         end) and
        .job.error == null' $tmp/reply.json
    id=$(jq .job.id $tmp/reply.json)
    strategy=$(jq -r .job.strategy $tmp/reply.json)
    nbdsnap -c $store wait $id
    job_done $id
}

make_origin $origin 16M
cp $origin $REF
start

# Writes before the first snapshot go to the origin.
scribble 100
for i in 1 2 3 4; do
    nbdsnap -c $store create s$i
    save_export $sock snap/s$i $tmp/s$i.img
    cmp $tmp/s$i.img $REF || fail "snap/s$i differs from the model"
    scribble $i
done
verify s1 s2 s3 s4
wait_for layers_are 4
[ "$(checkpoints)" = "s1:snapshot s2:snapshot s3:snapshot s4:snapshot" ]
check_dirty dirty/s3 3 4
check_dirty dirty/s2 2 3 4

# The oldest, by commit: its layer goes into the origin, which then
# holds s2's view.  (cbw: its layer just goes.)
delete s1 $(strategy commit)
if is_cbw; then [ "$strategy" = move ]; else [ "$strategy" = commit ]; fi
verify s2 s3 s4
qemu-img compare -f raw -F raw $tmp/s2.img "$(nbd_uri $sock snap/s2)"
check_origin $tmp/s2.img $REF
same_dirty dirty/s3
same_dirty dirty/s2
[ "$(checkpoints)" = "s2:snapshot s3:snapshot s4:snapshot" ]
wait_for layers_are 3
if nbdinfo --can connect "$(nbd_uri $sock snap/s1)" 2>/dev/null; then
    fail "snap/s1 is still served"
fi

# A middle one, by auto, keeping its bitmap.  Auto took the cheaper
# (cbw: moved the blocks only s3 kept into s2).
delete s3 --keep-bitmap
jq -e --arg m $snapshot_mode '.job.keep_bitmap == true and
       .job.strategy == (if $m == "cbw" then "move"
                         elif .job.commit_bytes <= .job.stream_bytes
                         then "commit" else "stream" end)' $tmp/reply.json
verify s2 s4
qemu-img compare -f raw -F raw $tmp/s4.img "$(nbd_uri $sock snap/s4)"
[ "$(checkpoints)" = "s2:snapshot s3:bitmap s4:snapshot" ]
wait_for layers_are 2
nbdsnap -c $store --json info s3 > $tmp/info.json
jq -e '.checkpoint.kind == "bitmap" and .checkpoint.export == null and
       .checkpoint.dirty_export == "dirty/s3"' $tmp/info.json
# dirty/s3 still reports the blocks changed since s3, as before.
same_dirty dirty/s3
jq -e --argjson n $(wc -l < $tmp/got-blocks) \
   '.checkpoint.changed_blocks == $n' $tmp/info.json
same_dirty dirty/s2
nbdinfo --list --json "$(nbd_uri $sock)" > $tmp/list.json
jq -e '[.exports[]."export-name"] | (index("snap/s3") == null) and
       (index("dirty/s3") != null) and (index("snap/s4") != null)' \
   $tmp/list.json
if nbdinfo --can connect "$(nbd_uri $sock snap/s3)" 2>/dev/null; then
    fail "snap/s3 is still served"
fi

# The newest, by stream (its layer is the one clients write; cbw: the
# one writes keep old contents in, moved into s2's).
delete s4 $(strategy stream)
if is_cbw; then [ "$strategy" = move ]; else [ "$strategy" = stream ]; fi
verify s2
qemu-img compare -f raw -F raw $REF "$(nbd_uri $sock)"
[ "$(checkpoints)" = "s2:snapshot s3:bitmap" ]
wait_for layers_are 1
# s4's bits went to s3: nothing was lost from either map.
same_dirty dirty/s3
same_dirty dirty/s2

# Writes after the merges land as usual; then another snapshot.
scribble 5
nbdsnap -c $store create s5
save_export $sock snap/s5 $tmp/s5.img
cmp $tmp/s5.img $REF || fail "snap/s5 differs from the model"
scribble 6
verify s2 s5
check_dirty dirty/s3 3 4 5 6

# Restart, with jobs held (-D snapshot.job_hold=1: functions.sh.in) so
# the revert is still running, half done, while it is checked.
stop_nbdkit $nbdkit_pid
start -D snapshot.job_hold=1
verify s2 s5
[ "$(checkpoints)" = "s2:snapshot s3:bitmap s5:snapshot" ]

# Revert to s2: the live volume is s2 as soon as the reply comes.
cp $REF $tmp/before-revert.img
nbdsnap -c $store --json revert s2 > $tmp/reply.json
cat $tmp/reply.json
[ "$(export_md5 $sock)" = "$(md5 $tmp/s2.img)" ] ||
    fail "the live volume is not s2 right after the revert"
jq -e '.job.kind == "revert" and .job.name == "s2"' $tmp/reply.json
id=$(jq .job.id $tmp/reply.json)
# Half way through the revert.
half=$(( $(min_steps $id) / 2 ))
job_release $id $half
wait_held $id $half
nbdsnap -c $store --json jobs > $tmp/jobs.json
jq -e --argjson id $id '.jobs[] | select(.id == $id) | .state == "running"' \
   $tmp/jobs.json ||
    fail "the revert ended before it was checked"
[ "$(export_md5 $sock)" = "$(md5 $tmp/s2.img)" ] ||
    fail "the live volume is not s2 half way through the revert"
[ "$(export_md5 $sock snap/s5)" = "$(md5 $tmp/s5.img)" ] ||
    fail "snap/s5 changed during the revert"
# A write during the job lands on top of s2.
cp $tmp/s2.img $REF
scribble 7
job_release $id
nbdsnap -c $store wait $id
job_done $id
verify s2 s5
# And one after it.
scribble 8
verify s2 s5
# Every block where the live volume now differs from s5 is marked
# changed since s5 (the revert's changes included).
dirty_blocks dirty/s5 > $tmp/got-blocks
python3 - $REF $tmp/s5.img $bs $tmp/got-blocks <<'EOF'
import sys
a = open(sys.argv[1], "rb").read()
b = open(sys.argv[2], "rb").read()
bs = int(sys.argv[3])
marked = set(int(x) for x in open(sys.argv[4]).read().split())
missing = [i for i in range(len(a) // bs)
           if a[i*bs:(i+1)*bs] != b[i*bs:(i+1)*bs] and i not in marked]
assert not missing, "changed since s5 but not in dirty/s5: %s" % missing[:10]
EOF
# The origin was never written after s2 was taken (row), or holds the
# live volume (cbw: the revert wrote s2's blocks back into it).
check_origin $tmp/s2.img $REF

# Restart: every view reads the same.  Files the manifest does not name
# (as a crash right after a merge would leave) are swept at start-up;
# other files are left alone.
stop_nbdkit $nbdkit_pid
touch $store/layer-999.data $store/layer-999.map $store/dirty-998.map \
      $store/layer-1x.data $store/notes.txt
start
for f in layer-999.data layer-999.map dirty-998.map; do
    [ ! -e $store/$f ] || fail "start-up left $f in the store"
done
[ -e $store/layer-1x.data ] && [ -e $store/notes.txt ] ||
    fail "start-up removed a file that is not a layer or map"
verify s2 s5
qemu-img compare -f raw -F raw $tmp/s5.img "$(nbd_uri $sock snap/s5)"
[ "$(checkpoints)" = "s2:snapshot s3:bitmap s5:snapshot" ]
nbdsnap -c $store --json info s3 |
    jq -e '.checkpoint.kind == "bitmap" and .checkpoint.export == null'
dirty_blocks dirty/s5 | cmp - $tmp/got-blocks ||
    fail "dirty/s5 changed across the restart"
nbdsnap -c $store --json jobs | jq -e 'all(.jobs[]; .state != "running")'

# delete --wait for humans: the plan, then the job's last line.
nbdsnap -c $store delete s5 --wait > $tmp/out
cat $tmp/out
grep "^deleting snapshot 's5' by " $tmp/out
grep -E "^job [0-9]+: delete s5 by (commit|stream|move): done" $tmp/out
[ "$(checkpoints)" = "s2:snapshot s3:bitmap" ]
[ "$(export_md5 $sock)" = "$(md5 $REF)" ] || fail "live changed by delete s5"
# revert --wait: done when it returns, and the volume is s2.
nbdsnap -c $store --json revert s2 --wait > $tmp/reply.json
cat $tmp/reply.json
jq -e '.job.kind == "revert" and .job.name == "s2" and .job.state == "done"' \
   $tmp/reply.json
[ "$(export_md5 $sock)" = "$(md5 $tmp/s2.img)" ] ||
    fail "the live volume is not s2 after revert --wait"
nbdsnap -c $store --json jobs | jq -e 'all(.jobs[]; .state != "running")'

# A revert's plan counts each page it copies once, however many layers
# hold it: the same 4K page written after each of three snapshots, and
# another page each time, make four pages to copy back.
nbdsnap -c $store create r1
for i in 1 2 3; do
    nbdsh -u "$(nbd_uri $sock)" -c "
h.pwrite(bytes([$i]) * 4096, 1 << 20)
h.pwrite(bytes([$i]) * 4096, ($i + 2) << 20)
h.flush()
"
    [ $i = 3 ] || nbdsnap -c $store create r1-$i
done
nbdsnap -c $store --json revert r1 --wait > $tmp/reply.json
cat $tmp/reply.json
jq -e '.job.state == "done" and .job.bytes_total == 4 * 4096 and
       .job.bytes_done == .job.bytes_total' $tmp/reply.json ||
    fail "the revert to r1 did not copy each changed page once"
