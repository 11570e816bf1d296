#!/usr/bin/env bash
# nbdkit-snapshot
# A commit into the origin flushes the origin from a second thread
# while it copies (so writing back overlaps the copy).  A flush that
# fails there must fail the job even when every later flush succeeds:
# a failed fdatasync reports its error once per open file, so the
# job's own final flush would not see it.  The origin here is an
# nbdkit sh plugin (parallel) whose flush fails exactly once, when a
# trigger file exists: every flush after that one succeeds.  The failed commit stays journaled, blocks
# other jobs with its reason, and resumes at the next start; then the
# origin holds exactly what the live volume showed.  In cbw mode the
# job that writes into the origin is a revert to s1 (which kept the
# old contents of the whole volume): the same holds, with s1's
# contents as the live volume throughout.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version
requires dd --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
trigger=$tmp/fail-next-flush

# 96 MiB: more than the flusher's 64 MiB step, so a commit of the
# whole volume asks for one flush while it copies.
size=$((96 << 20))
truncate -s $size $origin

cat > $tmp/origin.sh <<EOF
#!/usr/bin/env bash
f=$origin
case "\$1" in
    thread_model) echo parallel ;;
    get_size) stat -c %s \$f ;;
    can_write|can_flush) exit 0 ;;
    pread) dd if=\$f skip=\$4 count=\$3 iflag=skip_bytes,count_bytes \\
              status=none ;;
    pwrite) dd of=\$f seek=\$4 conv=notrunc oflag=seek_bytes \\
               status=none ;;
    flush)
        if rm $trigger 2>/dev/null; then
            echo "EIO injected flush failure" >&2
            exit 1
        fi
        sync \$f ;;
    *) exit 2 ;;
esac
EOF
chmod +x $tmp/origin.sh

start ()
{
    start_nbdkit -P $tmp/nbdkit.pid -U $sock \
                 --filter=$FILTER sh $tmp/origin.sh snapshot-store=$store
}

start
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/s1.img
# Every byte of the volume changed after s1: the commit copies it all.
nbdsh -u "$(nbd_uri $sock)" -c "
import random
rng = random.Random(7)
size = h.get_size()
step = 1 << 20
for off in range(0, size, step):
    h.pwrite(rng.randbytes(step), off)
h.flush()
"
save_export $sock "" $tmp/live.img

# The job, and the live volume as it must read from its start on.
if is_cbw; then
    job_args=(revert s1)
    want=$tmp/s1.img
else
    job_args=(delete s1 --strategy=commit)
    want=$tmp/live.img
fi

touch $trigger
status=0
nbdsnap -c $store "${job_args[@]}" > $tmp/out 2>&1 || status=$?
cat $tmp/out
[ "$status" -eq 0 ] || fail "${job_args[*]} was refused"
job="$(nbdsnap -c $store --json jobs | jq -r '.jobs[-1].id')"
status=0
nbdsnap -c $store wait "$job" > $tmp/out 2> $tmp/err || status=$?
cat $tmp/out $tmp/err
[ "$status" -eq 1 ] || fail "wait: exit status $status, expected 1"
grep -F "job $job failed" $tmp/err || fail "wait did not report the failure"
# The one failing flush was the flusher's, while the job copied.
[ ! -e $trigger ] || fail "the origin was never flushed during the commit"
grep -F "injected flush failure" $tmp/nbdkit.log ||
    fail "the injected flush failure is not in the log"
nbdsnap -c $store --json jobs |
    jq -e --argjson j "$job" '.jobs[] | select(.id == $j) |
                              .state == "failed"' ||
    fail "job $job is not failed"

# Journaled: another job is refused with the reason, and the views
# still read as before.
status=0
nbdsnap -c $store delete s1 > $tmp/out 2> $tmp/err || status=$?
cat $tmp/out $tmp/err
[ "$status" -eq 1 ] || fail "a second job was not refused"
grep -F "failed and must finish" $tmp/err || fail "no reason given"
[ "$(export_md5 $sock)" = "$(md5 $want)" ] ||
    fail "the live volume changed after the failed job"

# Restart: the commit resumes and completes; the origin then holds the
# live volume, and the snapshot is gone (cbw: the revert; s1 stays).
stop_nbdkit $nbdkit_pid
start
nbdsnap -c $store wait || fail "the resumed job did not finish"
nbdsnap -c $store --json list > $tmp/list
cat $tmp/list
jq -e --argjson n $(is_cbw && echo 1 || echo 0) \
   '[.checkpoints[] | select(.name == "s1")] | length == $n' $tmp/list ||
    fail "s1 is listed or not, wrongly, after the resumed job"
[ "$(export_md5 $sock)" = "$(md5 $want)" ] ||
    fail "the live volume changed through the resumed job"
stop_nbdkit $nbdkit_pid
cmp $origin $want || fail "the origin does not hold the live volume"
