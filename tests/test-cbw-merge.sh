#!/usr/bin/env bash
# nbdkit-snapshot
# Merges of copy-before-write snapshots, against a model.  Six
# snapshots s1..s6 of a 32M volume, each followed by seeded writes: a
# few MiB in a region of its own (so that each delete has blocks to
# move) and small random ones everywhere.  A copy of each snapshot is
# saved as it is taken; $REF is the live volume as it must read.
#   1. delete --strategy=commit|stream and --output are refused, saying
#      why, and start no job;
#   2. one job at a time; a move cancelled half way leaves every view as
#      it was;
#   3. deletes of a middle (s3), the newest (s6) and the oldest (s1)
#      snapshot while a client works on the live volume (model_client):
#      the other snapshots read as saved during and after each job, the
#      live volume as the client's model, and the job moved what it
#      said it would;
#   4. a revert to s4 while a client works: the live volume is s4 as
#      soon as the command returns, then the client's model; it cannot
#      be cancelled, and no snapshot is taken meanwhile;
#   5. a revert to s2 killed by kill -9 after a client's writes (all
#      flushed) and started again: the job resumes and ends; before and
#      after that, the live volume is s2 with the client's writes, and
#      the newer snapshots read as saved.
# After every job, every block where the live volume differs from a
# snapshot is marked in its dirty/ map.  At the end, after a clean
# restart, every view reads the same, and the origin file (a second
# reader) holds the live volume.  Jobs are held with
# -D snapshot.job_hold=1 (functions.sh.in) so that each is still
# running, at a known point, when it is checked.

SNAPSHOT_MODE=cbw
source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
bs=65536
REF=$tmp/ref.img
export REF

start ()
{
    start_store -D snapshot.job_hold=1
}

# scribble SEED OFFSET LENGTH: LENGTH bytes of fresh data at OFFSET
# (MiB), then 20 seeded random writes, zeroes and trims anywhere; each
# applied to $REF too (ref_ops).
scribble ()
{
    nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c "
import random
rng = random.Random($1)
size = h.get_size()
w(rng.randbytes($3 << 20), $2 << 20)
for i in range(20):
    n = rng.randint(1, 200000)
    off = rng.randrange(0, size - n + 1)
    op = rng.choice(['w', 'w', 'w', 'z', 't'])
    if op == 'w':
        w(rng.randbytes(n), off)
    elif op == 'z':
        z(n, off)
    else:
        t(n, off)
    check(off, n)
h.flush()
"
}

# verify NAME...: each snap/NAME reads as saved, and the live volume
# as $REF.
verify ()
{
    verify_views $sock $REF "$@"
}

# snaps_as_saved NAME...: each snap/NAME reads as saved (while a
# client changes the live volume).
snaps_as_saved ()
{
    local s
    for s in "$@"; do
        [ "$(export_md5 $sock snap/$s)" = "$(md5 $tmp/$s.img)" ] ||
            fail "snap/$s does not read as it was taken"
    done
}

checkpoints ()
{
    nbdsnap -c $store --json list |
        jq -r '[.checkpoints[] | "\(.name):\(.kind)"] | join(" ")'
}

job_field ()
{
    nbdsnap -c $store --json jobs |
        jq -r --argjson id $1 ".jobs[] | select(.id == \$id) | .$2"
}

# expect_refused MESSAGE NBDSNAP-ARGS...: exit status 1, nothing on
# stdout, MESSAGE on stderr.
expect_refused ()
{
    local msg="$1" status=0
    shift
    nbdsnap -c $store "$@" > $tmp/out 2> $tmp/err || status=$?
    cat $tmp/out $tmp/err
    [ $status -eq 1 ] || fail "nbdsnap $*: exit status $status, expected 1"
    [ ! -s $tmp/out ] || fail "nbdsnap $*: printed to stdout on error"
    grep -F -- "$msg" $tmp/err || fail "nbdsnap $*: no '$msg'"
}

# dirty_covers NAME...: every block where the live volume ($REF)
# differs from snapshot NAME ($tmp/NAME.img) is marked in dirty/NAME.
dirty_covers ()
{
    local s
    for s in "$@"; do
        nbdinfo --map --json "$(nbd_uri $sock dirty/$s)" > $tmp/map.json
        python3 - $REF $tmp/$s.img $tmp/map.json $bs $s <<'EOF'
import json, sys
live = open(sys.argv[1], "rb").read()
snap = open(sys.argv[2], "rb").read()
bs = int(sys.argv[4])
marked = set()
for e in json.load(open(sys.argv[3])):
    if e["type"] == 0:
        marked.update(range(e["offset"] // bs, (e["offset"] + e["length"]) // bs))
missing = [b for b in range(len(live) // bs)
           if live[b*bs:(b+1)*bs] != snap[b*bs:(b+1)*bs] and b not in marked]
assert not missing, "changed since %s but not in dirty/%s: %s" % \
    (sys.argv[5], sys.argv[5], missing[:10])
EOF
    done
}

# with_client SEED NBDSNAP-ARGS...: start the job NBDSNAP-ARGS (its
# reply in $tmp/reply.json, its id in $job), then a client
# (model_client) from the live volume as it then reads, saved as
# $tmp/start-SEED.img.  Once the client has started, the job goes half
# way and parks there, and during_job (defined by the caller) is
# called; then the job goes to its end, and both are waited for: the
# job is done with bytes_done == bytes_total, and the live volume is
# the client's model, which becomes $REF.
with_client ()
{
    local seed=$1 client
    shift
    rm -f $tmp/ready $tmp/started $tmp/go
    mkfifo $tmp/go
    nbdsnap -c $store --json "$@" > $tmp/reply.json
    cat $tmp/reply.json
    job=$(jq .job.id $tmp/reply.json)
    save_export $sock "" $tmp/start-$seed.img
    CLIENT_SEED=$seed CLIENT_OPS=150 CLIENT_START=$tmp/start-$seed.img \
    CLIENT_MODEL=$tmp/model-$seed.img CLIENT_READY=$tmp/ready \
    CLIENT_GO=$tmp/go CLIENT_STARTED=$tmp/started \
        nbdsh -u "$(nbd_uri $sock)" -c "$model_client" &
    client=$!
    cleanup_fn kill $client
    wait_for test -e $tmp/ready
    echo go > $tmp/go
    wait_for test -e $tmp/started
    half=$(( $(min_steps $job) / 2 ))
    job_release $job $half
    wait_held $job $half
    during_job
    job_release $job
    nbdsnap -c $store wait $job
    [ "$(job_field $job state)" = done ] || fail "job $job: $(job_field $job error)"
    [ "$(job_field $job bytes_done)" = "$(job_field $job bytes_total)" ]
    wait $client || fail "the client failed (see above)"
    cp $tmp/model-$seed.img $REF
    [ "$(export_md5 $sock)" = "$(md5 $REF)" ] ||
        fail "the live volume is not the client's model after job $job"
}

make_origin $origin 32M
cp $origin $REF
start

# s1..s6, each followed by writes into a region of its own:
#   after s1 [0, 2M), s2 [2M, 4M), s3 [4M, 10M), s4 [10M, 12M),
#   s5 [12M, 14M), s6 [14M, 18M).
regions=(x "0 2" "2 2" "4 6" "10 2" "12 2" "14 4")
for i in 1 2 3 4 5 6; do
    nbdsnap -c $store create s$i
    save_export $sock snap/s$i $tmp/s$i.img
    cmp $tmp/s$i.img $REF || fail "snap/s$i differs from the model"
    scribble $i ${regions[$i]}
done
all="s1:snapshot s2:snapshot s3:snapshot s4:snapshot s5:snapshot s6:snapshot"
[ "$(checkpoints)" = "$all" ]
verify s1 s2 s3 s4 s5 s6
dirty_covers s1 s2 s3 s4 s5 s6
# The origin is the live volume, written in place all along.
cmp $origin $REF

# ---- 1. What a cbw delete refuses ----

why="'s3' is a copy-before-write snapshot: deleting it moves the blocks it kept into the next older snapshot (or drops them, for the oldest); --strategy=commit|stream and --output apply to redirect-on-write stores"
expect_refused "$why" delete s3 --strategy=commit
expect_refused "$why" delete s3 --strategy=stream
expect_refused "$why" delete s3 --output=$tmp/final.img
expect_refused "$why" delete s3 --strategy=stream --output=$tmp/final.img
expect_refused "${why//s3/s1}" delete s1 --strategy=commit --wait
[ ! -e $tmp/final.img ] || fail "a refused --output created the file"
nbdsnap -c $store --json jobs | jq -e '.jobs == []'
[ "$(checkpoints)" = "$all" ]

# ---- 2. One job at a time; a move can be cancelled ----

nbdsnap -c $store --json delete s3 > $tmp/reply.json
cat $tmp/reply.json
job=$(jq .job.id $tmp/reply.json)
jq -e '.job.strategy == "move" and .job.move_bytes >= 6 * 1048576 and
       .job.bytes_total == .job.move_bytes' $tmp/reply.json
expect_refused "snapshot 's3' already has a job running (job $job, delete)" \
               delete s3
expect_refused "job $job (delete s3) is running: one job at a time" delete s2
expect_refused "job $job (delete s3) is running: one job at a time" revert s2
# Cancelled half way.
half=$(( $(min_steps $job) / 2 ))
job_release $job $half
wait_held $job $half
nbdsnap -c $store cancel $job
expect_refused "nbdsnap: wait: job $job cancelled" wait $job
[ "$(job_field $job state)" = cancelled ]
[ "$(checkpoints)" = "$all" ] || fail "a cancelled delete changed the list"
verify s1 s2 s3 s4 s5 s6

# ---- 3. Deletes while a client works ----

# A middle one: what only s3 kept moves into s2's layer, while s1 and
# s2 (which read s3's layer) are read.
during_job ()
{
    snaps_as_saved s1 s2
}
with_client 1 delete s3
jq -e '.job.strategy == "move" and .job.bytes_total == .job.move_bytes' \
   $tmp/reply.json
[ "$(checkpoints)" = "s1:snapshot s2:snapshot s4:snapshot s5:snapshot s6:snapshot" ]
verify s1 s2 s4 s5 s6
dirty_covers s1 s2 s4 s5 s6

# The newest: the client's writes keep old contents in s6's layer while
# it moves into s5's (the end of the job moves what came after); s4 and
# s5 read s6's layer.  (snap/s6 is refused while it is being deleted.)
during_job ()
{
    snaps_as_saved s4 s5
}
with_client 2 delete s6
[ "$(checkpoints)" = "s1:snapshot s2:snapshot s4:snapshot s5:snapshot" ]
verify s1 s2 s4 s5
dirty_covers s1 s2 s4 s5

# The oldest: its layer just goes (nothing to move).
during_job () { :; }
with_client 3 delete s1
jq -e '.job.bytes_total == 0' $tmp/reply.json
[ "$(checkpoints)" = "s2:snapshot s4:snapshot s5:snapshot" ]
verify s2 s4 s5
dirty_covers s2 s4 s5

# ---- 4. A revert while a client works ----

stop_nbdkit $nbdkit_pid
start
verify s2 s4 s5

# The live volume is s4 as soon as the reply comes (the client starts
# from it); the revert cannot be cancelled, and no snapshot is taken
# during it.
during_job ()
{
    cmp $tmp/start-4.img $tmp/s4.img ||
        fail "the live volume was not s4 as soon as the revert returned"
    expect_refused "job $job is a revert, which cannot stop half way" \
                   cancel $job
    expect_refused "a revert to 's4' is in progress" create s9
    snaps_as_saved s2 s5
}
with_client 4 revert s4
jq -e '.job.kind == "revert" and .job.name == "s4"' $tmp/reply.json
[ "$(checkpoints)" = "s2:snapshot s4:snapshot s5:snapshot" ]
verify s2 s4 s5
dirty_covers s2 s4 s5

# ---- 5. A revert killed by kill -9 after a client's writes ----

nbdsnap -c $store --json revert s2 > $tmp/reply.json
cat $tmp/reply.json
job=$(jq .job.id $tmp/reply.json)
save_export $sock "" $tmp/start-5.img
cmp $tmp/start-5.img $tmp/s2.img ||
    fail "the live volume was not s2 as soon as the revert returned"
rm -f $tmp/ready $tmp/started $tmp/go
mkfifo $tmp/go
# (The client flushes at the end: every write is durable before the
# kill.)
CLIENT_SEED=5 CLIENT_OPS=150 CLIENT_START=$tmp/start-5.img \
CLIENT_MODEL=$tmp/model-5.img CLIENT_READY=$tmp/ready \
CLIENT_GO=$tmp/go CLIENT_STARTED=$tmp/started \
    nbdsh -u "$(nbd_uri $sock)" -c "$model_client" &
client=$!
cleanup_fn kill $client
wait_for test -e $tmp/ready
echo go > $tmp/go
wait $client || fail "the client failed (see above)"
cp $tmp/model-5.img $REF
# Killed half way.
half=$(( $(min_steps $job) / 2 ))
job_release $job $half
wait_held $job $half
echo "kill -9 with $(job_field $job bytes_done) of" \
     "$(job_field $job bytes_total) bytes done"
stop_nbdkit $nbdkit_pid KILL
grep -q '^job ' $store/manifest || fail "the revert is not in the journal"
start
# At once (the resumed job held), and after the resumed job ends.
wait_held $job 0
verify s2 s4 s5
job_release $job
nbdsnap -c $store wait
nbdsnap -c $store --json jobs > $tmp/jobs.json
cat $tmp/jobs.json
jq -e '.jobs[-1] | .kind == "revert" and .name == "s2" and
       .state == "done" and .resumed' $tmp/jobs.json ||
    fail "the revert did not resume and finish"
verify s2 s4 s5
dirty_covers s2 s4 s5

# A clean restart: the same; and the origin file, read beside nbdkit,
# holds the live volume.
stop_nbdkit $nbdkit_pid
start
verify s2 s4 s5
[ "$(checkpoints)" = "s2:snapshot s4:snapshot s5:snapshot" ]
nbdsnap -c $store --json jobs | jq -e 'all(.jobs[]; .state != "running")'
cmp $origin $REF || fail "the origin file does not hold the live volume"
