#!/usr/bin/env bash
# nbdkit-snapshot
# Guarantee 3: after kill -9 at a random moment and a restart, every
# block that differs from a checkpoint's contents is marked in its
# bitmap (extra marks are allowed, missing ones never).  Rounds:
#   1. bitmap-only checkpoint, no snapshot: writes go to the origin in
#      place;
#   2. a snapshot exists and its layer already holds the blocks that
#      are then overwritten in place after the checkpoint;
#   3. like 1, on the same store after the earlier crashes;
#   4. a snapshot is the newest checkpoint (its bits are recovered from
#      its layer at start-up).
# The kill comes after a random number of writes (seeded, printed).

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdinfo --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
bs=65536

start ()
{
    start_store
}

cat > $tmp/writer.py <<'EOF'
import os, random
rng = random.Random(int(os.environ["SEED"]))
progress = os.environ["PROGRESS"]
size = h.get_size()
try:
    for j in range(100000):
        n = rng.choice([512, 4096, 65536, 100000])
        off = rng.randrange(0, size - n)
        if rng.random() < 0.1:
            h.zero(n, off)
        else:
            h.pwrite(rng.randbytes(n), off)
        if j % 8 == 7:
            with open(progress + ".tmp", "w") as f:
                f.write("%d\n" % (j + 1))
            os.rename(progress + ".tmp", progress)
except nbd.Error:
    pass
EOF

written_at_least ()
{
    [ -s $tmp/progress ] && [ "$(cat $tmp/progress)" -ge "$1" ]
}

# check_marked CHECKPOINT SAVED: every block of the live volume that
# differs from SAVED is marked in dirty/CHECKPOINT.
check_marked ()
{
    save_export $sock "" $tmp/live.img
    nbdinfo --map --json "$(nbd_uri $sock dirty/$1)" > $tmp/map.json
    python3 - $tmp/live.img $2 $tmp/map.json $bs <<'EOF'
import json, sys
live = open(sys.argv[1], "rb").read()
saved = open(sys.argv[2], "rb").read()
exts = json.load(open(sys.argv[3]))
bs = int(sys.argv[4])
marked = set()
for e in exts:
    if e["type"] == 0:
        marked.update(range(e["offset"] // bs, (e["offset"] + e["length"]) // bs))
changed = {b for b in range(len(live) // bs)
           if live[b*bs:(b+1)*bs] != saved[b*bs:(b+1)*bs]}
missing = changed - marked
assert not missing, "changed but not marked: %s" % sorted(missing)[:10]
assert changed, "the writer changed nothing before the crash"
print("%d blocks changed, %d marked, none missing" % (len(changed), len(marked)))
EOF
}

# round N: checkpoint cN, then writes, kill -9 after a random count.
crash_round ()
{
    local n=$1 seed=$2 kill_after
    nbdsnap -c $store create c$n --bitmap-only
    save_export $sock "" $tmp/c$n.img
    kill_after=$(( 20 + seed % 200 ))
    echo "round $n: seed $seed, kill -9 after $kill_after writes"
    rm -f $tmp/progress
    SEED=$seed PROGRESS=$tmp/progress \
        nbdsh -u "$(nbd_uri $sock)" -c "exec(open('$tmp/writer.py').read())" &
    writer=$!
    wait_for written_at_least $kill_after
    stop_nbdkit $nbdkit_pid KILL
    wait $writer || true
    start
    check_marked c$n $tmp/c$n.img
}

make_origin $origin 16M
start
crash_round 1 $RANDOM

# Round 2: the snapshot's layer already holds every block.
nbdsnap -c $store create s2
nbdsh -u "$(nbd_uri $sock)" -c '
size = h.get_size()
for off in range(0, size, 1 << 20):
    h.pwrite(b"\x5a" * (1 << 20), off)
h.flush()
'
crash_round 2 $RANDOM

crash_round 3 $RANDOM

# Round 4: the newest checkpoint is a snapshot, so its bits are kept in
# memory and recovered from the layer at start-up.
nbdsnap -c $store create s4
save_export $sock "" $tmp/s4.img
seed=$RANDOM
kill_after=$(( 20 + seed % 200 ))
echo "round 4: seed $seed, kill -9 after $kill_after writes"
rm -f $tmp/progress
SEED=$seed PROGRESS=$tmp/progress \
    nbdsh -u "$(nbd_uri $sock)" -c "exec(open('$tmp/writer.py').read())" &
writer=$!
wait_for written_at_least $kill_after
# A flush makes some of the writes durable in the layer.
nbdsh -u "$(nbd_uri $sock)" -c 'h.flush()'
stop_nbdkit $nbdkit_pid KILL
wait $writer || true
start
check_marked s4 $tmp/s4.img

# Earlier checkpoints still cover everything since them.
check_marked c1 $tmp/c1.img
