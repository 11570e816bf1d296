#!/usr/bin/env bash
# Regenerate the seed corpora (fuzz/corpus/TARGET/) from stores that the
# real filter makes under nbdkit, in the states a store is found in:
# stopped cleanly (sealed maps), killed (unsealed maps, intent bits
# set), killed during a merge or a revert (a job in the journal, a
# revert's map), a backup chain.  The control requests come from the
# documented protocol.  Run from a built tree:
#
#   fuzz/make-seeds.sh [BUILDDIR]     (default: the source tree)
#
# Needs nbdkit, nbdsh and python3.  Existing seeds named seed-* are
# replaced; others (inputs that once found a bug) are kept.
set -euo pipefail

src="$(cd "$(dirname "$0")/.." && pwd)"
build="$(cd "${1:-$src}" && pwd)"
filter="$build/filters/snapshot/.libs/nbdkit-snapshot-filter.so"
nbdsnap="$build/tools/nbdsnap/nbdsnap"
corpus="$src/fuzz/corpus"
pack="$src/fuzz/pack-store.py"
for f in "$filter" "$nbdsnap"; do
  [ -e "$f" ] || { echo "make-seeds: $f not built" >&2; exit 1; }
done

tmp="$(mktemp -d)"
pid=
cleanup ()
{
  if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || :; fi
  [ -n "${KEEP_TMP:-}" ] && echo "kept $tmp" || rm -rf "$tmp"
}
trap cleanup EXIT

sock="$tmp/nbd.sock"
# Each store STORE has its origin in STORE.img.
start ()                        # start STORE MODE [ARGS...]
{
  local store="$1" mode="$2"
  shift 2
  rm -f "$tmp/pid" "$sock"
  nbdkit -f -U "$sock" -P "$tmp/pid" --filter="$filter" \
         file "$store.img" snapshot-store="$store" \
         snapshot-mode="$mode" snapshot-block-size=16K "$@" \
         >> "$tmp/nbdkit.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    if [ -s "$tmp/pid" ] &&
       nbdinfo --can connect "nbd+unix:///?socket=$sock" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  cat "$tmp/nbdkit.log" >&2
  exit 1
}
stop ()                         # stop [SIGNAL]
{
  kill -"${1:-TERM}" "$pid"
  wait "$pid" 2>/dev/null || :
  pid=
}
write ()                        # write OFFSET BYTE
{
  nbdsh -u "nbd+unix:///?socket=$sock" \
        -c "h.pwrite(bytes([$2]) * 300, $1); h.flush()"
}
snap () { "$nbdsnap" -c "$1" "${@:2}" > /dev/null; }

# The stores.  Volume of 1 MiB, block size 16K.
make_origin ()                  # make_origin STORE
{
  python3 -c "
import sys
with open(sys.argv[1], 'wb') as f:
    for p in range(256):
        f.write(('page %d' % p).encode().ljust(4096, b'\0'))" \
    "$1.img"
}
copy ()                         # copy STORE NEW: the store and its origin
{
  cp -a "$tmp/$1" "$tmp/$2"
  cp "$tmp/$1.img" "$tmp/$2.img"
}

stores=()
# row, stopped cleanly: layers, snapshots, a bitmap-only checkpoint.
make_origin "$tmp/row"
start "$tmp/row" row
write 0 1; snap "$tmp/row" create s1
write 70000 2; snap "$tmp/row" create b1 --bitmap-only
write 300000 3; snap "$tmp/row" create s2
write 5000 4
stop
stores+=(row)
# killed FROM NEW MODE CMD...: a copy NEW of store FROM, started with
# jobs held (-D snapshot.job_hold=1) and killed after CMD ran (an
# nbdsnap command line for NEW, or "write OFFSET BYTE"; ";" separates
# commands).
killed ()
{
  local from="$1" new="$2" mode="$3" cmd=()
  shift 3
  copy "$from" "$new"
  start "$tmp/$new" "$mode" snapshot-adopt-origin=true -D snapshot.job_hold=1
  for word in "$@" ";"; do
    if [ "$word" != ";" ]; then cmd+=("$word"); continue; fi
    if [ "${cmd[0]}" = write ]; then write "${cmd[@]:1}"
    else snap "$tmp/$new" "${cmd[@]}"; fi
    cmd=()
  done
  stop KILL
  stores+=("$new")
}
# row, killed after writes since a bitmap-only checkpoint: intent bits
# set, unsealed maps; during a delete (a stream keeping a bitmap);
# during a revert.
killed row row-killed row create b2 --bitmap-only ";" write 600000 5 ";" \
  write 900000 6
killed row row-job row delete s1 --strategy=stream --keep-bitmap
killed row row-revert row revert s2
# cbw, stopped cleanly.
make_origin "$tmp/cbw"
start "$tmp/cbw" cbw
write 0 1; snap "$tmp/cbw" create s1
write 0 2; write 200000 3; snap "$tmp/cbw" create s2
write 100000 4; snap "$tmp/cbw" create b1 --bitmap-only
write 8192 5
stop
stores+=(cbw)
# cbw, killed during a revert (its revert map), and during a delete.
killed cbw cbw-revert cbw revert s1 ";" write 40000 7
killed cbw cbw-job cbw delete s2
# A backup chain of two restore points.
start "$tmp/row" row
"$nbdsnap" backup "nbd+unix:///snap/s1?socket=$sock" --to "$tmp/chain/" \
  > /dev/null
"$nbdsnap" backup "nbd+unix:///snap/s2?socket=$sock" --since s1 \
  --to "$tmp/chain" > /dev/null
stop
stores+=(chain)

# The corpora.
for t in manifest mapfile intent journal control storeread store; do
  mkdir -p "$corpus/$t"
  rm -f "$corpus/$t"/seed-*
done
hex () { printf '%b' "$(printf '\\x%02x' "$@")"; }
for s in "${stores[@]}"; do
  d="$tmp/$s"
  # Manifests as they are (flag 0: checksums untouched).
  { hex 0; cat "$d/manifest"; } > "$corpus/manifest/seed-$s"
  # Whole stores: the plugin's way and nbdsnap check's, the filter's.
  case "$s" in
    row|row-killed|cbw-revert|chain)
      python3 "$pack" 2 "$d" "$corpus/storeread/seed-$s-plugin" ;;
  esac
  case "$s" in
    row-job|cbw|chain)
      python3 "$pack" 0 "$d" "$corpus/storeread/seed-$s-check" ;;
  esac
  [ "$s" = chain ] || python3 "$pack" 2 "$d" "$corpus/store/seed-$s"
done
# Map files of each kind, sealed and not, with what the header says
# expected (flag 0).
mapseed () { { hex 0; cat "$tmp/$1/$2.map"; } > "$corpus/mapfile/seed-$1-$2"; }
mapseed row "$(cd "$tmp/row" && ls layer-*.map | head -1 | sed 's/.map$//')"
mapseed row "$(cd "$tmp/row" && ls dirty-*.map | head -1 | sed 's/.map$//')"
mapseed row-killed "$(cd "$tmp/row-killed" && ls dirty-*.map | tail -1 |
                     sed 's/.map$//')"
mapseed row-killed intent
mapseed cbw-revert "$(cd "$tmp/cbw-revert" && ls revert-*.map |
                     sed 's/.map$//')"
# The intent map with its volume (block size 16K: 4096 << 2; 1 MiB),
# from the same boot and from another.
for s in row row-killed cbw-revert; do
  { hex 0 2 0 0 16 0 0 0 0 0; cat "$tmp/$s/intent.map"; } \
    > "$corpus/intent/seed-$s-same-boot"
done
{ hex 2 2 0 0 16 0 0 0 0 0; cat "$tmp/row-killed/intent.map"; } \
  > "$corpus/intent/seed-row-killed-other-boot"

# The journal: the job lines of the killed stores, aimed at the
# template stores' snapshots (s2, s3, s4; b1), with the ids they had.
journal ()                      # journal NAME FLAGS LINE
{
  { hex "$2"; printf '%s\n' "$3"; } > "$corpus/journal/seed-$1"
}
line () { grep '^job ' "$tmp/$1/manifest"; }
journal row-delete 0 "$(line row-job | sed 's/ s1 / s2 /')"
journal row-revert 0 "$(line row-revert | sed 's/ s2$/ s3/')"
journal row-commit 0 "$(line row-job | sed 's/ s1 / s2 /; s/stream/commit/')"
journal row-output 0 "$(line row-job | sed 's/ s1 / s2 /;
  s|output=-|output=@DIR@/merged.img|; s/keep-bitmap=1/keep-bitmap=0/')"
journal cbw-delete 1 "$(line cbw-job | sed 's/ s2 / s3 /')"
journal cbw-revert 1 "$(line cbw-revert | sed 's/ s1$/ s2/')"
journal cbw-stop 5 "$(line cbw-job | sed 's/ s2 / s4 /')"

# Control requests, one per line (flag bit 0: cbw; bit 1: wait for
# each job).
control ()                      # control NAME FLAGS LINE...
{
  local name="$1" flags="$2"
  shift 2
  { hex "$flags"; printf '%s\n' "$@"; } > "$corpus/control/seed-$name"
}
control list 0 '{"cmd":"list"}'
control info 0 '{"cmd":"info","name":"s2"}' '{"cmd":"info","name":"b1"}'
control create 0 '{"cmd":"create","name":"new"}' \
  '{"cmd":"create","name":"bm","bitmap_only":true}' '{"cmd":"list"}'
control delete 2 '{"cmd":"delete","name":"s2","strategy":"stream"}' \
  '{"cmd":"jobs"}' '{"cmd":"wait","job":20,"timeout_ms":100}'
control delete-output 2 \
  "$(printf '%s' '{"cmd":"delete","name":"s2","strategy":"stream",' \
            '"keep_bitmap":true,"output":"@DIR@/out.img"}')"
control delete-bitmap 0 '{"cmd":"delete","name":"b1"}'
control revert 3 '{"cmd":"revert","name":"s3"}' '{"cmd":"jobs"}'
control cancel 1 '{"cmd":"delete","name":"s3"}' '{"cmd":"cancel","job":21}' \
  '{"cmd":"job-release","job":21,"steps":1}'
control bad 0 '{"cmd":"nope"}' '[1,2]' '{"cmd":' '{"name":"s2"}' \
  '{"cmd":"info","name":"../x"}' '{"cmd":"wait","job":-1}'
echo "make-seeds: $(find "$corpus" -name 'seed-*' | wc -l) seeds in $corpus"
