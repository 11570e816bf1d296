#!/usr/bin/env bash
# nbdkit-snapshot
# Test the basic life of a store: writes go to the origin until the
# first snapshot, which freezes it (row; in cbw mode writes go on
# going to the origin in place, and a second reader of the origin
# file sees them while snap/NAME reads as taken); snapshots read as
# they were taken and are read-only; nbdinfo --list and nbdsnap
# list/info/create report them.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires qemu-io --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
live=$(nbd_uri $sock)
bs=65536
size=$((64 * 1024 * 1024))

make_origin $origin 64M
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store

# The store is created, with its control socket.
test -d $store
test -S $store/control.sock
test -f $store/manifest

# No snapshots yet.
nbdsnap -c $store --json list > $tmp/list.json
cat $tmp/list.json
jq -e '.checkpoints == [] and (has("ok") | not)' $tmp/list.json
nbdinfo --list --json "$live" > $tmp/exports.json
cat $tmp/exports.json
# (Other kinds of export, such as dirty/NAME, may be listed too: only
# "" and snap/NAME are checked.  The live volume's description may
# go on after the number of snapshots.)
views='[.exports[] | select(.["export-name"] == "" or
                           (.["export-name"] | startswith("snap/")))]'
jq -e "$views"' | length == 1' $tmp/exports.json
jq -e --arg m $snapshot_mode '.exports[] | select(.["export-name"] == "") | .description |
  test("^live volume \\(\($m), 0 snapshots(, [^()]*)?\\)$")' $tmp/exports.json

# Before the first snapshot, writes go straight to the origin.
REF=$origin.ref
cp $origin $REF
export REF
nbdsh -u "$live" -c "$ref_ops" -c '
w(pat(0xaa, 65536), 0)
w(b"hello, world", 1000000)
h.flush()
'
cmp $origin $REF

# Keep a copy of the live volume as it is now: snap/s1 must always
# read like this.
save_export $sock "" $tmp/s1.img
cmp $tmp/s1.img $REF

t0=$(date +%s)
nbdsnap -c $store create s1
t1=$(date +%s)
origin_md5=$(md5 $origin)
[ "$origin_md5" = "$(md5 $tmp/s1.img)" ]

# After the snapshot: a full block, a partial block, a zeroed block
# with nbdsh, and two blocks with qemu-io.  Blocks 3, 160, 320, 480
# and 481 change.
nbdsh -u "$live" -c "$ref_ops" -c '
w(pat(0x11, 65536), 3 * 65536)
w(b"xyz", 10 * 1024 * 1024 + 7)
z(65536, 20 * 1024 * 1024)
'
qemu-io -f raw -c 'write -P 0x55 30M 128K' "$live"
python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"\x55" * 131072, 30 * 1024 * 1024)
' $REF

[ "$(export_md5 $sock)" = "$(md5 $REF)" ]
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1.img)" ]
[ "$(md5 $REF)" != "$origin_md5" ]
# The origin file, read beside the running nbdkit: row froze it at s1;
# cbw wrote it in place, so this second reader sees the new data while
# snap/s1 (read again after it) still shows the old.
check_origin $tmp/s1.img $REF
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1.img)" ]

# nbdsnap --json: list and info.
nbdsnap -c $store --json list > $tmp/list.json
cat $tmp/list.json
jq -e --arg m $snapshot_mode --arg store "$(realpath $store)" --argjson size $size '
  (has("ok") | not) and
  .store == $store and .mode == $m and .block_size == 65536 and
  .size == $size and (.checkpoints | length) == 1' $tmp/list.json
jq -e --arg m $snapshot_mode --argjson t0 $t0 --argjson t1 $t1 '.checkpoints[0] |
  .name == "s1" and .kind == "snapshot" and .mode == $m and
  .export == "snap/s1" and
  .created >= $t0 and .created <= $t1 and
  .changed_blocks == 5 and .changed_bytes == 5 * 65536 and
  .layer_bytes >= 196611 and .layer_bytes <= 5 * 65536' $tmp/list.json
# Space on disk: s1's files hold what was written since (zeroed pages
# are holes, so it may be less than layer_bytes), the store more.
jq -e '.checkpoints[0].disk_bytes > 0 and
       .disk_bytes > .checkpoints[0].disk_bytes' $tmp/list.json
created=$(jq -r '.checkpoints[0].created' $tmp/list.json)
created_iso=$(jq -r '.checkpoints[0].created_iso' $tmp/list.json)
[ "$created_iso" = "$(date -u -d @$created +%Y-%m-%dT%H:%M:%SZ)" ]

nbdsnap -c $store --json info s1 > $tmp/info.json
cat $tmp/info.json
[ $(wc -l < $tmp/info.json) -eq 1 ]
jq -e --slurpfile l $tmp/list.json \
   '(has("ok") | not) and .checkpoint == $l[0].checkpoints[0]' $tmp/info.json

# Human output names the snapshot.
nbdsnap -c $store list > $tmp/list.txt
cat $tmp/list.txt
grep -w s1 $tmp/list.txt
grep -E '^NAME +KIND +CREATED +SPACE +CHANGED$' $tmp/list.txt
grep -E '^store: [0-9.]+ [KMG]iB on disk$' $tmp/list.txt
nbdsnap -c $store info s1 > $tmp/info.txt
cat $tmp/info.txt
grep -w s1 $tmp/info.txt
grep -E '^disk bytes: [0-9]+ \(' $tmp/info.txt

# nbdinfo --list: the live volume and snap/s1, with descriptions.
nbdinfo --list --json "$live" > $tmp/exports.json
cat $tmp/exports.json
jq -e "$views"' | map(.["export-name"]) | sort == ["", "snap/s1"]' \
   $tmp/exports.json
jq -e --arg m $snapshot_mode '.exports[] | select(.["export-name"] == "") |
  (.description | test("^live volume \\(\($m), 1 snapshots?(, [^()]*)?\\)$")) and
  .["export-size"] == 67108864 and .is_read_only == false' \
   $tmp/exports.json
jq -e --arg m $snapshot_mode --arg iso "$created_iso" '.exports[] |
  select(.["export-name"] == "snap/s1") |
  .description == "\($m) snapshot taken \($iso), 5 blocks (320.0 KiB) changed since" and
  .["export-size"] == 67108864 and .is_read_only == true' \
   $tmp/exports.json
nbdinfo --list "$live" | grep 'snap/s1'

# Writes to a snapshot fail with EPERM, even from a client that does
# not check the read-only flag first.
nbdsh -u "$(nbd_uri $sock snap/s1)" -c '
assert h.is_read_only()
h.set_strict_mode(0)
for what, op in (("write", lambda: h.pwrite(b"x" * 512, 0)),
                 ("zero", lambda: h.zero(512, 0)),
                 ("trim", lambda: h.trim(512, 0))):
    try:
        op()
    except nbd.Error as ex:
        assert ex.errno == "EPERM", "%s: %s" % (what, ex)
    else:
        raise AssertionError("%s to snap/s1 succeeded" % what)
'
if qemu-io -f raw -c 'write -P 0x66 0 512' "$(nbd_uri $sock snap/s1)"; then
    fail "qemu-io wrote to snap/s1"
fi
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1.img)" ]

# A second snapshot; then one more block changes (block 0, which
# was written to the origin before s1).
cp $REF $tmp/s2.img
nbdsnap -c $store --json create s2 > $tmp/create.json
cat $tmp/create.json
jq -e '(has("ok") | not) and .checkpoint.name == "s2" and
  .checkpoint.export == "snap/s2" and .checkpoint.changed_blocks == 0' \
   $tmp/create.json
nbdsh -u "$live" -c "$ref_ops" -c 'w(pat(0x22, 4096), 8192)'

[ "$(export_md5 $sock)" = "$(md5 $REF)" ]
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1.img)" ]
[ "$(export_md5 $sock snap/s2)" = "$(md5 $tmp/s2.img)" ]

nbdsnap -c $store --json list > $tmp/list.json
cat $tmp/list.json
jq -e '[.checkpoints[].name] == ["s1", "s2"]' $tmp/list.json
jq -e '.checkpoints[0] | .changed_blocks == 6 and
  .changed_bytes == 6 * 65536 and
  .layer_bytes >= 196611 and .layer_bytes <= 5 * 65536' $tmp/list.json
jq -e '.checkpoints[1] | .changed_blocks == 1 and
  .changed_bytes == 65536 and
  .layer_bytes >= 4096 and .layer_bytes <= 65536' $tmp/list.json
nbdinfo --list --json "$live" > $tmp/exports.json
jq -e --arg m $snapshot_mode '.exports[] | select(.["export-name"] == "") |
  .description | test("^live volume \\(\($m), 2 snapshots(, [^()]*)?\\)$")' \
   $tmp/exports.json
jq -e --arg m $snapshot_mode '.exports[] | select(.["export-name"] == "snap/s2") |
  (.description | test("^\($m) snapshot taken .*, 1 blocks? \\(64.0 KiB\\) changed since$"))' \
   $tmp/exports.json

# Layer files are sparse raw files of the volume size.
ls -l $store
n=0
for f in $store/layer-*.data; do
    [ "$(stat -c %s $f)" -eq $size ]
    n=$((n + 1))
done
[ $n -eq 2 ]

# The origin has not changed since the first snapshot, and still has
# not once nbdkit is gone (row); it holds the live volume (cbw).
check_origin $tmp/s1.img $REF
stop_nbdkit $nbdkit_pid
check_origin $tmp/s1.img $REF
