#!/usr/bin/env bash
# nbdkit-snapshot
# One control client cannot stall the others: a client that sends
# 3000 requests at once and does not read its replies (so they fill
# the socket) does not stop nbdsnap from being answered meanwhile; and
# once that client reads, it gets every one of its replies, in order:
# exactly 3000 lines, each a JSON object with "ok": true.

source ./functions.sh
set -e
set -x

requires python3 --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
make_origin $origin 8M

start_store
# Checkpoints make each "list" reply longer, so the replies that the
# flooding client leaves unread fill the socket sooner.
for c in s1 s2 s3 s4; do
    nbdsnap -c $store create $c
done

cat > $tmp/flood.py <<'EOF'
import json, os, select, socket, sys, threading, time

path, sent_marker, go_marker = sys.argv[1:4]
N = 3000
REQ = b'{"cmd":"list"}\n'
DEADLINE = time.monotonic() + 120 * int(os.environ.get("SNAPSHOT_TEST_SLOWDOWN", "1"))

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.setblocking(False)

sent = 0                        # requests sent so far
blocked = threading.Event()     # the socket was full at least once
done = threading.Event()        # every request has been sent
send_error = []

def sender():
    global sent
    data = REQ * N
    off = 0
    try:
        while off < len(data):
            if time.monotonic() > DEADLINE:
                raise TimeoutError("sending took too long")
            try:
                off += s.send(data[off:off + 65536])
                sent = off // len(REQ)
            except BlockingIOError:
                # The server is not reading us at the moment: say so,
                # and go on once there is room (the reader drains).
                blocked.set()
                select.select([], [s], [], 1)
    except Exception as ex:
        send_error.append(ex)
    done.set()

t = threading.Thread(target=sender, daemon=True)
t.start()

# Tell the shell once every request is sent, or the sender has found
# the socket full: either way the server now has more replies to send
# us than the socket holds, and we do not read them.
while not done.is_set() and not blocked.is_set():
    time.sleep(0.01)
print("flood: sent %d of %d requests (%s)" %
      (sent, N, "all" if done.is_set() else "socket full"), flush=True)
with open(sent_marker, "w") as f:
    f.write("%d\n" % sent)

# Wait for the shell's go-ahead before reading anything.
while not os.path.exists(go_marker):
    if time.monotonic() > DEADLINE:
        sys.exit("flood: no go-ahead from the shell")
    time.sleep(0.05)

# Read every reply (the sender may still be sending meanwhile).
buf = b""
lines = []
while len(lines) < N:
    if time.monotonic() > DEADLINE:
        sys.exit("flood: got %d replies of %d (sent %d)" %
                 (len(lines), N, sent))
    r, _, _ = select.select([s], [], [], 1)
    if not r:
        continue
    try:
        d = s.recv(1 << 20)
    except BlockingIOError:
        continue
    if not d:
        sys.exit("flood: the server closed after %d replies of %d" %
                 (len(lines), N))
    buf += d
    *complete, buf = buf.split(b"\n")
    lines += complete
t.join()
assert not send_error, send_error
assert sent == N, sent

# No more than N replies: close our side, and the server must close
# its own with nothing more to say.
s.shutdown(socket.SHUT_WR)
while True:
    if time.monotonic() > DEADLINE:
        sys.exit("flood: the server did not close the connection")
    r, _, _ = select.select([s], [], [], 1)
    if not r:
        continue
    try:
        d = s.recv(1 << 20)
    except BlockingIOError:
        continue
    except ConnectionResetError:
        break
    if not d:
        break
    buf += d
assert buf == b"", "more than %d replies: %r" % (N, buf[:200])
assert len(lines) == N, "%d replies, expected %d" % (len(lines), N)

for i, line in enumerate(lines):
    r = json.loads(line.decode("utf-8"))
    assert isinstance(r, dict) and r.get("ok") is True, \
        "reply %d: %r" % (i, line[:200])
    assert [c["name"] for c in r["checkpoints"]] == \
        ["s1", "s2", "s3", "s4"], "reply %d: %r" % (i, line[:200])
print("flood: %d replies, all ok" % len(lines), flush=True)
EOF

# Cleanup hook: kill the flooding client if it is still there.
kill_flood ()
{
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

python3 $tmp/flood.py $store/control.sock $tmp/sent $tmp/go &
flood_pid=$!
cleanup_fn kill_flood $flood_pid
wait_for test -s $tmp/sent

# The flooding client neither reads nor goes away: others are still
# answered.
if ! timeout $(( 20 * slowdown )) "$NBDSNAP" -c $store --json list > $tmp/list.json; then
    fail "nbdsnap list got no answer while another control client" \
         "left its replies unread"
fi
jq -e '[.checkpoints[].name] == ["s1", "s2", "s3", "s4"]' $tmp/list.json

# Now the flooding client reads all its replies.
touch $tmp/go
wait $flood_pid || fail "the flooding client did not get its 3000 replies"

# nbdkit is alive and well.
kill -0 $nbdkit_pid
nbdsnap -c $store --json list |
    jq -e '[.checkpoints[].name] == ["s1", "s2", "s3", "s4"]'
[ "$(export_md5 $sock snap/s1)" = "$(md5 $origin)" ]
stop_nbdkit $nbdkit_pid
