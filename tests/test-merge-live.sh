#!/usr/bin/env bash
# nbdkit-snapshot
# Merges run while clients work.  A 64M volume; s1, then 48M written
# into its layer; s2.  While a job runs, a background nbdsh client
# does a bounded, seeded series of random reads, writes, zeroes and
# flushes, some of them many in flight at once, over the whole live
# volume.  It keeps its own model (the live volume as saved before it
# started, with its writes applied) and checks every read against it;
# afterwards the whole live volume equals the model.
#   1. delete s1 by commit: its 48M layer goes into the origin, while
#      snap/s2 (which reads that layer) is read and must not change;
#   2. delete s2 by stream: the origin's pages go up into the layer the
#      client is writing; a snapshot s3 taken meanwhile must not
#      change either.
# The jobs are held (-D snapshot.job_hold=1: functions.sh.in) until the
# client has started, then let go half way, where the views are
# checked, while the client goes on; then they run to the end.  While
# each runs, its progress never goes backwards or past its total.  A
# restart at the end: the same.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock

start ()
{
    start_store -D snapshot.job_hold=1
}

# The client is model_client (functions.sh.in).

job_field ()
{
    nbdsnap -c $store --json jobs |
        jq -r --argjson id $job ".jobs[] | select(.id == \$id) | .$1"
}

# progress_ok: the job's progress is sane and never goes backwards;
# succeed once it has ended.
progress_ok ()
{
    local j state done total
    j=$(nbdsnap -c $store --json jobs |
            jq -c --argjson id $job '.jobs[] | select(.id == $id)')
    state=$(jq -r .state <<<"$j")
    done=$(jq .bytes_done <<<"$j")
    total=$(jq .bytes_total <<<"$j")
    [ "$done" -le "$total" ] ||
        fail "job $job: bytes_done $done > bytes_total $total"
    [ "$done" -ge "$last_done" ] ||
        fail "job $job: bytes_done went back from $last_done to $done"
    last_done=$done
    [ "$state" != running ]
}

# run_with_client SEED NBDSNAP-DELETE-ARGS...: start the client (it
# loads its model and waits), start the job, check it is running, let
# the client go, and the job half way; there, call during_job (defined
# by the caller); then let the job go and wait for both.  Afterwards the live volume is the client's
# model, in $REF.
run_with_client ()
{
    local seed=$1 client state
    shift
    save_export $sock "" $tmp/start-$seed.img
    rm -f $tmp/ready $tmp/started $tmp/go
    mkfifo $tmp/go
    CLIENT_SEED=$seed CLIENT_OPS=500 CLIENT_START=$tmp/start-$seed.img \
    CLIENT_MODEL=$tmp/model-$seed.img CLIENT_READY=$tmp/ready \
    CLIENT_GO=$tmp/go CLIENT_STARTED=$tmp/started \
        nbdsh -u "$(nbd_uri $sock)" -c "$model_client" &
    client=$!
    cleanup_fn kill $client
    wait_for test -e $tmp/ready

    nbdsnap -c $store --json delete "$@" > $tmp/reply.json
    cat $tmp/reply.json
    job=$(jq .job.id $tmp/reply.json)
    state=$(job_field state)
    [ "$state" = running ] || fail "job $job was $state before the client started"
    echo go > $tmp/go
    wait_for test -e $tmp/started
    half=$(( $(min_steps $job) / 2 ))
    job_release $job $half
    wait_held $job $half
    during_job
    last_done=0
    progress_ok || :
    job_release $job
    wait_for progress_ok
    [ "$(job_field state)" = done ] || fail "job $job: $(job_field error)"
    [ "$(job_field bytes_done)" = "$(job_field bytes_total)" ]
    wait $client || fail "the client failed (see above)"
    REF=$tmp/model-$seed.img
    [ "$(export_md5 $sock)" = "$(md5 $REF)" ] ||
        fail "the live volume is not the client's model after job $job"
}

make_origin $origin 64M
start
nbdsnap -c $store create s1
nbdsh -u "$(nbd_uri $sock)" -c '
import random
rng = random.Random(1)
for off in range(0, 48 << 20, 1 << 20):
    h.pwrite(rng.randbytes(1 << 20), off)
h.pwrite(rng.randbytes(65536), 50 << 20)
h.flush()
'
nbdsnap -c $store create s2
save_export $sock snap/s2 $tmp/s2.img
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"\x5a" * 300000, 45 << 20)'

# 1. Commit s1's layer into the origin.
during_job ()
{
    [ "$(export_md5 $sock snap/s2)" = "$(md5 $tmp/s2.img)" ] ||
        fail "snap/s2 changed during the commit of s1"
}
run_with_client 1 s1 --strategy=commit
jq -e '.job.strategy == "commit" and .job.commit_bytes >= (48 * 1048576)' \
   $tmp/reply.json
[ "$(export_md5 $sock snap/s2)" = "$(md5 $tmp/s2.img)" ] ||
    fail "snap/s2 changed after the commit of s1"
cmp $origin $tmp/s2.img || fail "the origin is not s2 after the commit"

# 2. Stream the origin into the layer the client writes; take s3
# meanwhile.
during_job ()
{
    nbdsnap -c $store create s3
    save_export $sock snap/s3 $tmp/s3.img
}
run_with_client 2 s2 --strategy=stream
jq -e '.job.strategy == "stream" and .job.stream_bytes >= (16 * 1048576)' \
   $tmp/reply.json
[ "$(export_md5 $sock snap/s3)" = "$(md5 $tmp/s3.img)" ] ||
    fail "snap/s3 changed while s2 was streamed"
nbdsnap -c $store --json list |
    jq -e '[.checkpoints[].name] == ["s3"]'

# Restart: the same.
stop_nbdkit $nbdkit_pid
start
[ "$(export_md5 $sock)" = "$(md5 $REF)" ] ||
    fail "the live volume changed across the restart"
[ "$(export_md5 $sock snap/s3)" = "$(md5 $tmp/s3.img)" ] ||
    fail "snap/s3 changed across the restart"
