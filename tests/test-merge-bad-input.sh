#!/usr/bin/env bash
# nbdkit-snapshot
# Merge jobs refuse bad input with clear errors and lose nothing.
# Each refusal exits 1 with nothing on stdout and the reason on
# stderr: an unknown snapshot; a bad strategy; --output onto an
# existing file, or for a snapshot that is not the oldest; merge
# options and revert for a bitmap-only checkpoint; an unknown job to
# cancel or wait for; a snapshot in use by a snap/ or
# dirty/ connection; a second job on the same snapshot, or on another,
# while one runs; a snapshot taken during a revert; cancelling a
# revert or a commit.  A cancelled stream leaves everything as it was.
# Afterwards every view reads as before.  Then commit into a read-only origin
# (nbdkit -r; a read-only plugin) is refused, and auto streams
# instead.  Last, a connection to snap/S opened while S is being
# deleted must not bring the server down.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
bs=65536

# Jobs are held (-D snapshot.job_hold=1: functions.sh.in) so that they
# are still running while other requests are refused, until the test
# releases them.
start ()
{
    start_nbdkit -P $tmp/nbdkit.pid -U $sock -D snapshot.job_hold=1 "$@"
}

# expect_error [-c STORE] MESSAGE NBDSNAP-ARGS...: exit status 1,
# nothing on stdout, and the message on stderr.
expect_error ()
{
    local st=$store msg status=0
    if [ "$1" = -c ]; then st=$2; shift 2; fi
    msg="$1"
    shift
    nbdsnap -c $st "$@" > $tmp/out 2> $tmp/err || status=$?
    cat $tmp/out $tmp/err
    [ "$status" -eq 1 ] || fail "nbdsnap $*: exit status $status, expected 1"
    [ ! -s $tmp/out ] || fail "nbdsnap $*: printed to stdout on error"
    grep -F -- "$msg" $tmp/err ||
        fail "nbdsnap $*: no '$msg' in: $(cat $tmp/err)"
}

# scribble SEED: some random writes to the live volume of $sock.
scribble ()
{
    nbdsh -u "$(nbd_uri $sock)" -c "
import random
rng = random.Random($1)
size = h.get_size()
for i in range(20):
    n = rng.randint(1, 3 * $bs)
    h.pwrite(rng.randbytes(n), rng.randrange(0, size - n + 1))
h.flush()
"
}

# verify NAME...: each snap/NAME reads as $tmp/NAME.img, and the live
# volume as $tmp/live.img.
verify ()
{
    verify_views $sock $tmp/live.img "$@"
}

checkpoints ()
{
    nbdsnap -c $store --json list |
        jq -r '[.checkpoints[] | "\(.name):\(.kind)"] | join(" ")'
}

# job_state ID
job_state ()
{
    nbdsnap -c $store --json jobs |
        jq -r --argjson id $1 '.jobs[] | select(.id == $id) | .state'
}

# hold EXPORT NAME: keep a connection to EXPORT open in the background
# until release NAME.
hold ()
{
    rm -f $tmp/ready-$2
    mkfifo $tmp/go-$2
    nbdsh -u "$(nbd_uri $sock $1)" -c "
h.pread(4096, 0)
open('$tmp/ready-$2', 'w').close()
open('$tmp/go-$2').read()
" &
    eval holder_$2=$!
    cleanup_fn kill $!
    wait_for test -e $tmp/ready-$2
}

release ()
{
    local pid
    eval pid=\$holder_$1
    echo go > $tmp/go-$1
    wait $pid || fail "the connection held as $1 failed"
    rm -f $tmp/go-$1
}

make_origin $origin 32M
start --filter=$FILTER file $origin snapshot-store=$store

scribble 1
nbdsnap -c $store create s1
cp $origin $tmp/origin0.img     # frozen from now on
scribble 2
nbdsnap -c $store create s2
# (12M more in s2's layer, so that committing it takes a while.)
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"\x5a" * (12 << 20), 8 << 20)'
scribble 3
nbdsnap -c $store create b1 --bitmap-only
scribble 4
nbdsnap -c $store create s3
scribble 5
for s in s1 s2 s3; do
    save_export $sock snap/$s $tmp/$s.img
done
save_export $sock "" $tmp/live.img
list0="s1:snapshot s2:snapshot b1:bitmap s3:snapshot"
[ "$(checkpoints)" = "$list0" ]

# Unknown names, bad options.
expect_error "nbdsnap: delete: no checkpoint named 'nosuch'" delete nosuch
expect_error "no checkpoint named 'nosuch'" delete nosuch --strategy=stream
expect_error "nbdsnap: revert: no checkpoint named 'nosuch'" revert nosuch
expect_error "--strategy=sideways: expected auto, commit or stream" \
             delete s1 --strategy=sideways
touch $tmp/exists.img
expect_error "the file exists" delete s1 --strategy=stream \
             --output=$tmp/exists.img
[ ! -s $tmp/exists.img ] || fail "--output wrote over an existing file"
for strategy in commit stream auto; do
    expect_error "--output applies only to the oldest snapshot" \
                 delete s2 --strategy=$strategy --output=$tmp/new.img
done
[ ! -e $tmp/new.img ] || fail "a refused --output created the file"

# A bitmap-only checkpoint has no data to merge or revert to.
for opt in --strategy=commit --strategy=stream --keep-bitmap \
           --output=$tmp/new.img; do
    expect_error "'b1' is a bitmap-only checkpoint: it has no data to merge" \
                 delete b1 $opt
done
expect_error "'b1' is a bitmap-only checkpoint: it keeps no data to revert to" \
             revert b1

# --wait belongs to the commands that start jobs.
for c in "create w9" "info s1" "list" "jobs" "wait"; do
    expect_error "--wait is an option of delete and revert only" $c --wait
done
expect_error "--to is an option of backup only" delete s1 --wait --to x
expect_error "--progress is an option of backup, wait, and delete or revert with --wait" \
             delete s1 --progress

# Unknown jobs.
expect_error "nbdsnap: cancel: no running job 999999" cancel 999999
expect_error "'abc' is not a job id" cancel abc
expect_error "nbdsnap: wait: no job 999999" wait 999999
[ "$(checkpoints)" = "$list0" ] || fail "refused requests changed the list"
nbdsnap -c $store --json jobs | jq -e '.jobs == []'

# A snapshot read by a connection cannot be deleted.
hold snap/s2 a
hold dirty/s1 b
expect_error "snapshot 's2' is in use by 1 connection" delete s2
expect_error "snapshot 's1' is in use by 1 connection" delete s1 --strategy=stream
hold snap/s2 c
expect_error "snapshot 's2' is in use by 2 connections" delete s2
nbdsnap -c $store --json info s2 | jq -e '.checkpoint.connections == 2'
nbdsnap -c $store --json info s1 | jq -e '.checkpoint.connections == 1'
release a
release b
release c
# The clients have gone; nbdkit closes its side just after.
unused () {
    nbdsnap -c $store --json info $1 | jq -e '.checkpoint.connections == 0'
}
wait_for unused s1
wait_for unused s2
nbdsnap -c $store --json jobs | jq -e '.jobs == []'

# One job at a time.
nbdsnap -c $store --json delete s1 --strategy=stream > $tmp/reply.json
job=$(jq .job.id $tmp/reply.json)
running="snapshot 's1' already has a job running (job $job, delete)"
expect_error "$running" delete s1
expect_error "$running" delete s1 --strategy=commit
expect_error "$running" revert s1
other="job $job (delete s1) is running: one job at a time"
expect_error "$other" delete s2
expect_error "$other" delete s3 --strategy=commit
expect_error "$other" revert s2
expect_error "$other" delete b1
[ "$(job_state $job)" = running ] ||
    fail "job $job ended before the checks were done"
# Half way, the same.
job_release $job 4
wait_held $job 4
expect_error "$running" delete s1
expect_error "$other" delete s2
# Cancelled, it leaves everything as it was.
nbdsnap -c $store cancel $job
expect_error "nbdsnap: wait: job $job cancelled" wait $job
[ "$(job_state $job)" = cancelled ]
expect_error "no running job $job" cancel $job
[ "$(checkpoints)" = "$list0" ] || fail "a cancelled delete changed the list"
verify s1 s2 s3
cmp $origin $tmp/origin0.img || fail "the origin changed"

# delete --wait follows its job to the end: cancelled, that is an
# error, with nothing on stdout.
nbdsnap -c $store delete s1 --strategy=stream --wait --progress=2 \
        > $tmp/wait.out 2> $tmp/wait.err &
waiter=$!
one_running () {
    nbdsnap -c $store --json jobs |
        jq -e '[.jobs[] | select(.state == "running")] | length == 1'
}
wait_for one_running
job=$(nbdsnap -c $store --json jobs |
          jq '.jobs[] | select(.state == "running") | .id')
# It is waiting (its first progress line is out) when the job is
# cancelled.
wait_for grep -qE "^[0-9]+/100" $tmp/wait.err
nbdsnap -c $store cancel $job
status=0
wait $waiter || status=$?
cat $tmp/wait.out $tmp/wait.err
[ $status -eq 1 ] || fail "delete --wait of a cancelled job: exit $status"
grep -F "nbdsnap: delete: job $job cancelled" $tmp/wait.err
! grep -q "^100/100" $tmp/wait.err
[ ! -s $tmp/wait.out ] || fail "delete --wait printed to stdout on error"
[ "$(job_state $job)" = cancelled ]
[ "$(checkpoints)" = "$list0" ] || fail "a cancelled delete changed the list"
verify s1 s2 s3

# A revert cannot be cancelled, and no snapshot is taken during it.
nbdsnap -c $store --json revert s3 > $tmp/reply.json
job=$(jq .job.id $tmp/reply.json)
expect_error "job $job is a revert, which cannot stop half way" cancel $job
expect_error "a revert to 's3' is in progress" create s9
expect_error "job $job (revert s3) is running: one job at a time" delete s2
[ "$(job_state $job)" = running ] ||
    fail "job $job ended before the checks were done"
job_release $job
nbdsnap -c $store wait $job
[ "$(job_state $job)" = done ]
cp $tmp/s3.img $tmp/live.img
verify s1 s2 s3
[ "$(checkpoints)" = "$list0" ] || fail "the revert changed the list"

# After all of it, and a restart, every view reads as before.
stop_nbdkit $nbdkit_pid
start --filter=$FILTER file $origin snapshot-store=$store
verify s1 s2 s3
[ "$(checkpoints)" = "$list0" ]
cmp $origin $tmp/origin0.img || fail "the origin changed"

# A commit cannot be cancelled either: it writes into the origin that
# s1 reads through.  It finishes, and the other views are unchanged.
nbdsnap -c $store --json delete s1 --strategy=commit > $tmp/reply.json
job=$(jq .job.id $tmp/reply.json)
expect_error "job $job commits 's1' into the origin below, which cannot stop half way" \
    cancel $job
[ "$(job_state $job)" = running ] ||
    fail "job $job ended before the checks were done"
# The control socket's "wait": a short one returns with the job still
# running (held); bad ones are refused; a long one returns when the job
# ends (released from another connection), and a request sent behind it
# on the same connection is answered after it.
# So is job-release: steps must be a count.
python3 - $store/control.sock $job <<'EOF'
import json, socket, sys
path, job = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX)
s.connect(path)
f = s.makefile("rw")
def ask(*reqs):
    for r in reqs:
        f.write(json.dumps(r) + "\n")
    f.flush()
    return [json.loads(f.readline()) for _ in reqs]
[r] = ask({"cmd": "wait", "job": job, "timeout_ms": 10})
assert r["ok"] and r["job"]["state"] == "running", r
for bad, msg in [({"timeout_ms": -1}, '"timeout_ms" must be 0 to 60000'),
                 ({"timeout_ms": "soon"}, '"timeout_ms" must be 0 to 60000'),
                 ({"job": 999999}, "no job 999999"),
                 ({"job": "x"}, '"job" must be a job id')]:
    req = {"cmd": "wait", "job": job}
    req.update(bad)
    [r] = ask(req)
    assert not r["ok"] and msg in r["error"], (bad, r)
for bad, msg in [({"steps": -1}, '"steps" must be 0 or more'),
                 ({"steps": "all"}, '"steps" must be 0 or more'),
                 ({"job": 999999}, "no running job 999999")]:
    req = {"cmd": "job-release", "job": job}
    req.update(bad)
    [r] = ask(req)
    assert not r["ok"] and msg in r["error"], (bad, r)
[r] = ask({"cmd": "jobs"})
assert [x["held"] for x in r["jobs"] if x["id"] == job] == [True], r
for req in ({"cmd": "wait", "job": job, "timeout_ms": 60000}, {"cmd": "jobs"}):
    f.write(json.dumps(req) + "\n")
f.flush()
# Released from another connection: whether the long wait came in
# before the job ended or after, its reply says done.
s2 = socket.socket(socket.AF_UNIX)
s2.connect(path)
f2 = s2.makefile("rw")
f2.write(json.dumps({"cmd": "job-release", "job": job}) + "\n")
f2.flush()
r = json.loads(f2.readline())
assert r["ok"], r
w, j = [json.loads(f.readline()) for _ in range(2)]
assert w["ok"] and w["job"]["state"] == "done", w
assert w["job"]["bytes_done"] == w["job"]["bytes_total"], w
assert [x["state"] for x in j["jobs"] if x["id"] == job] == ["done"], j
print("wait: ok")
EOF
[ "$(job_state $job)" = done ]
verify s2 s3
stop_nbdkit $nbdkit_pid

# A read-only origin cannot take a commit; auto streams instead.
# ro_check STORE [--output=FILE]: s1 (the only snapshot) holds a few
# changed blocks, so commit is the cheaper; the server is read-only.
ro_check ()
{
    local st=$1 job
    shift
    expect_error -c $st \
        "cannot commit 's1' into the origin: the origin is read-only" \
        delete s1 --strategy=commit
    nbdsnap -c $st --json list | jq -e '[.checkpoints[].name] == ["s1"]'
    nbdsnap -c $st --json jobs | jq -e '.jobs == []'
    nbdsnap -c $st --json delete s1 "$@" > $tmp/reply.json ||
        fail "$st: delete s1 $* (auto) did not fall back to stream"
    cat $tmp/reply.json
    jq -e '.job.strategy == "stream" and
           .job.commit_bytes < .job.stream_bytes' $tmp/reply.json ||
        fail "$st: delete s1 $* (auto) did not fall back to stream"
    job=$(jq .job.id $tmp/reply.json)
    store=$st job_release $job
    nbdsnap -c $st wait $job
    [ "$(export_md5 $sock)" = "$(md5 $tmp/ro-live.img)" ] ||
        fail "$st: the live volume changed"
}

# (a) nbdkit -r over a writable file.
cp $tmp/origin0.img $tmp/ro-origin.img
start --filter=$FILTER file $tmp/ro-origin.img snapshot-store=$tmp/ro-store
nbdsnap -c $tmp/ro-store create s1
scribble 6
save_export $sock "" $tmp/ro-live.img
stop_nbdkit $nbdkit_pid
start -r --filter=$FILTER file $tmp/ro-origin.img snapshot-store=$tmp/ro-store
ro_check $tmp/ro-store
cmp $tmp/ro-origin.img $tmp/origin0.img || fail "nbdkit -r: the origin changed"
stop_nbdkit $nbdkit_pid

# (b) a read-only plugin.
start --filter=$FILTER pattern size=16M snapshot-store=$tmp/pat-store
nbdsnap -c $tmp/pat-store create s1
scribble 7
save_export $sock "" $tmp/ro-live.img
ro_check $tmp/pat-store --output=$tmp/pat.img
stop_nbdkit $nbdkit_pid
cmp $tmp/pat.img $tmp/ro-live.img || fail "pat.img is not the live volume"

# A connection to snap/S opened while S is being deleted (by a commit,
# which changes the layer S reads): refused, or else it reads S as it
# was taken; either way the server stays up, the connection reads S or
# gets an error once S is gone, and the other views are intact.
start --filter=$FILTER file $origin snapshot-store=$store
nbdsnap -c $store --json delete s2 --strategy=commit > $tmp/reply.json
job=$(jq .job.id $tmp/reply.json)
rm -f $tmp/ready-late
mkfifo $tmp/go-late
nbdsh -u "$(nbd_uri $sock snap/s2)" -c "
import hashlib
def whole():
    return hashlib.md5(h.pread(h.get_size(), 0)).hexdigest()
print('during', whole(), flush=True)
open('$tmp/ready-late', 'w').close()
open('$tmp/go-late').read()
try:
    print('after', whole())
except nbd.Error as e:
    print('error after the delete:', e)
" > $tmp/late.out 2>&1 &
late=$!
cleanup_fn kill $late
# (If the connection is refused, nbdsh exits without ever being ready.)
wait_for eval "test -e $tmp/ready-late || ! kill -0 $late 2>/dev/null"
if [ -e $tmp/ready-late ]; then
    [ "$(job_state $job)" = running ] ||
        fail "job $job ended before snap/s2 was read"
fi
job_release $job
nbdsnap -c $store wait $job
if kill -0 $late 2>/dev/null; then echo go > $tmp/go-late; fi
wait $late || true
cat $tmp/late.out
kill -0 $nbdkit_pid 2>/dev/null ||
    fail "nbdkit died when a connection to a deleted snapshot read it"
if grep '^during ' $tmp/late.out; then
    grep -Fx "during $(md5 $tmp/s2.img)" $tmp/late.out ||
        fail "snap/s2 opened during its delete did not read as s2"
fi
if grep '^after ' $tmp/late.out; then
    grep -Fx "after $(md5 $tmp/s2.img)" $tmp/late.out ||
        fail "snap/s2 read after its delete did not read as s2"
fi
# The filter refuses it, saying why.
! grep '^during ' $tmp/late.out || fail "snap/s2 was opened during its delete"
grep -F "export 'snap/s2': snapshot 's2' is being deleted (job $job)" \
    $nbdkit_log || fail "no refusal of snap/s2 in the log"
nbdsnap -c $store --json list |
    jq -e '[.checkpoints[].name] == ["b1", "s3"]'
verify s3
