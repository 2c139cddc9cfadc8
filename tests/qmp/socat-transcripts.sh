#!/usr/bin/env bash
# Management-socket transcripts spoken with socat, the way an operator pokes a QMP socket.
#
# Usage: tests/qmp/socat-transcripts.sh [VHOST_THIN_BINARY]   (default target/release/vhost-thin)
#
# Starts a daemon on a fresh pool, then plays every tests/qmp/transcripts/*.txt through
# `socat - UNIX-CONNECT:SOCK`, one connection per transcript:
#   `> TEXT`  is sent as one line (`{{repeat:C:N}}` in it stands for N copies of C),
#   `< TEXT`  is the next line the server must send, after normalising what changes from run
#             to run: `<N>` for version numbers, timestamps and pause times, `<V>` for the
#             package version, `<DIR>` for the test directory, `<SERIAL>` for generated
#             serials; `<*>` in an expected line matches any text,
#   `#` lines and blank lines are comments.
# The replies must be exactly those lines, in order, and nothing more. Then: many clients at
# once, and a client that never reads while another is served. Prints one line per check and
# "N passed, M failed"; exits 1 on any failure.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:-target/release/vhost-thin}")
command -v socat >/dev/null || { echo "socat not found (apt-get install socat)" >&2; exit 1; }
[ -x "$bin" ] || { echo "no daemon binary at $bin" >&2; exit 1; }

work=$(mktemp -d /var/tmp/vhost-thin-socat.XXXXXX)
sock=$work/qmp.sock
daemon_pid=
lazy_pid=
cleanup() {
  [ -n "$lazy_pid" ] && kill "$lazy_pid" 2>/dev/null
  if [ -n "$daemon_pid" ]; then
    kill "$daemon_pid" 2>/dev/null
    wait "$daemon_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $1"; }
fail() {
  failed=$((failed + 1))
  echo "FAIL $1"
  shift
  for l in "$@"; do printf '       %s\n' "$l"; done
}

# Volatile values out, placeholders in; CR of the CRLF line ends dropped.
dir_re=$(printf '%s' "$work" | sed 's/[][\.*^$/]/\\&/g')
normalise() {
  sed -E -e 's/\r$//' \
    -e "s/$dir_re/<DIR>/g" \
    -e 's/"(major|minor|micro|created|pause-us|seconds|microseconds)":[0-9]+/"\1":<N>/g' \
    -e 's/"package":"vhost-thin [^"]*"/"package":"vhost-thin <V>"/g' \
    -e 's/"serial":"vt-[0-9a-f]+"/"serial":"<SERIAL>"/g'
}

# An expected line as a bash pattern: every character literal except `<*>`.
pattern_of() {
  local s=$1 out="" lit
  while :; do
    lit=${s%%'<*>'*}
    out+=$(printf '%s' "$lit" | sed 's/[^A-Za-z0-9]/\\&/g')
    [[ $s == *'<*>'* ]] || break
    s=${s#*'<*>'}
    out+='*'
  done
  printf '%s' "$out"
}

# `{{repeat:C:N}}` → N copies of C (for oversized messages).
expand() {
  local l=$1 re='^(.*)\{\{repeat:(.):([0-9]+)\}\}(.*)$'
  while [[ $l =~ $re ]]; do
    local pre=${BASH_REMATCH[1]} c=${BASH_REMATCH[2]} n=${BASH_REMATCH[3]} post=${BASH_REMATCH[4]}
    l=$pre$(head -c "$n" /dev/zero | tr '\0' "$c")$post
  done
  printf '%s\n' "$l"
}

# One session: the lines of stdin go to the socket; the server's lines come out normalised.
# socat half-closes after the input; the daemon answers everything, then closes.
session() {
  timeout 60 socat -t 30 - "UNIX-CONNECT:$sock" | normalise
}

run_transcript() {
  local file=$1 name line
  name=$(basename "$file" .txt)
  local -a expected=() got=()
  : >"$work/in"
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in
      '>') echo >>"$work/in" ;;
      '> '*) expand "${line#> }" >>"$work/in" ;;
      '<'*) expected+=("${line#< }") ;;
      '#'* | '') ;;
      *) fail "$name" "line not understood: $line"; return ;;
    esac
  done <"$file"
  mapfile -t got < <(session <"$work/in")
  local i n=${#expected[@]} bad=()
  [ ${#got[@]} -gt "$n" ] && n=${#got[@]}
  for ((i = 0; i < n; i++)); do
    local e=${expected[i]-<nothing>} g=${got[i]-<nothing>} pat
    pat=$(pattern_of "$e")
    # shellcheck disable=SC2053 # the right side is a pattern on purpose
    if [[ $g != $pat ]]; then
      bad+=("line $((i + 1)): expected ${e:0:300}" "         got      ${g:0:300}")
    fi
  done
  if [ ${#bad[@]} -eq 0 ]; then pass "transcript $name (${#expected[@]} replies)"; else fail "transcript $name" "${bad[@]}"; fi
}

# --- the daemon: a pool with one disk, as tests/qmp/test_qmp.py starts it.
"$bin" pool create -m "$work/pool.meta" -d "$work/pool.data" --data-size 256MiB >/dev/null || exit 1
"$bin" thin create -m "$work/pool.meta" -d "$work/pool.data" --id 0 --size 64MiB --name disk0 >/dev/null || exit 1
RUST_LOG=info "$bin" serve -m "$work/pool.meta" -d "$work/pool.data" --qmp "$sock" \
  --socket-dir "$work" --disk "name=disk0,socket=$work/disk0.sock" >/dev/null 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 400); do [ -S "$sock" ] && break; sleep 0.025; done
[ -S "$sock" ] || { echo "no management socket; daemon log:" >&2; cat "$work/daemon.log" >&2; exit 1; }

for t in "$here"/transcripts/*.txt; do
  run_transcript "$t"
done

# --- many clients: 20 sessions connected at once (each waits a second before its command),
# each gets its own replies and nobody else's.
pids=()
for i in $(seq 20); do
  {
    echo '{"execute": "qmp_capabilities"}'
    sleep 1
    echo "{\"execute\": \"query-version\", \"id\": \"c$i\"}"
    echo "{\"execute\": \"query-disks\", \"id\": \"d$i\"}"
  } | session >"$work/many.$i" &
  pids+=($!)
done
bad=()
for i in $(seq 20); do
  wait "${pids[i - 1]}"
  ids=$(grep -o '"id":"[a-z0-9]*"' "$work/many.$i" | tr '\n' ' ')
  [ "$ids" = "\"id\":\"c$i\" \"id\":\"d$i\" " ] || bad+=("client $i: ids $ids")
  [ "$(wc -l <"$work/many.$i")" -eq 4 ] || bad+=("client $i: $(wc -l <"$work/many.$i") lines")
done
if [ ${#bad[@]} -eq 0 ]; then pass "20 concurrent socat clients each get their replies"; else fail "20 concurrent socat clients" "${bad[@]}"; fi

# --- a client that never reads: socat's output goes to a FIFO that this script holds open
# and never reads, so the pipe, socat, the socket and the daemon's queue for it all fill up.
# It has negotiated, so it is also due every event. Another client must still be answered
# at once, including a command that sends an event to everybody.
mkfifo "$work/lazy.out"
exec 9<>"$work/lazy.out"
{
  echo '{"execute": "qmp_capabilities"}'
  for ((i = 0; i < 20000; i++)); do echo '{"execute": "query-commands"}'; done
} >"$work/lazy.in"
socat -t 600 - "UNIX-CONNECT:$sock" <"$work/lazy.in" >"$work/lazy.out" 2>/dev/null &
lazy_pid=$!
# Stuck once socat stops reading its input short of the end (the daemon stopped reading it).
size=$(stat -c %s "$work/lazy.in")
prev=-1
pos=0
for _ in $(seq 150); do
  sleep 0.2
  pos=$(awk '/^pos:/ {print $2}' "/proc/$lazy_pid/fdinfo/0" 2>/dev/null || echo -1)
  [ "$pos" = "$prev" ] && [ "$pos" -lt "$size" ] && break
  prev=$pos
done
t0=$(date +%s%N)
out=$(printf '%s\n' '{"execute": "qmp_capabilities"}' \
  '{"execute": "disk-resize", "arguments": {"name": "disk0", "size": "128MiB"}, "id": "grow"}' \
  '{"execute": "query-version", "id": "prompt"}' | session)
ms=$((($(date +%s%N) - t0) / 1000000))
if [[ $out == *'"id":"grow","return":{"guest-notified":false}'* && $out == *'"id":"prompt","return"'* ]] &&
  [ "$pos" -lt "$size" ] && kill -0 "$lazy_pid" 2>/dev/null &&
  grep -q "does not read its events" "$work/daemon.log"; then
  pass "a client that never reads blocks only itself (stuck after $pos of $size bytes sent; another client answered in ${ms} ms)"
else
  still=$(kill -0 "$lazy_pid" 2>/dev/null && echo yes || echo no)
  fail "a client that never reads" "answered in ${ms} ms; lazy client still running: $still, read $pos of $size bytes" \
    "reply: ${out:0:400}" "$(grep -c 'does not read' "$work/daemon.log") event-drop warnings in the daemon log"
fi
kill "$lazy_pid" 2>/dev/null
wait "$lazy_pid" 2>/dev/null
lazy_pid=
exec 9<&-
out=$(printf '%s\n' '{"execute": "qmp_capabilities"}' '{"execute": "query-version", "id": "after"}' | session)
if [[ $out == *'"id":"after","return"'* ]]; then pass "daemon serves new clients after the stuck one is gone"; else fail "daemon after the stuck client" "$out"; fi

# --- the daemon's log has one line per command with its outcome.
if grep -q 'qmp command="blockdev-add" .*outcome="error" class="CommandNotFound"' "$work/daemon.log" &&
  grep -q 'qmp command="disk-add" .*outcome="ok"' "$work/daemon.log"; then
  pass "daemon log: one line per command with its outcome"
else
  fail "daemon log: one line per command" "$(grep ' qmp ' "$work/daemon.log" | head -5)"
fi

kill -TERM "$daemon_pid"
if wait "$daemon_pid"; then pass "SIGTERM exits 0"; else fail "SIGTERM exits 0" "$(tail -5 "$work/daemon.log")"; fi
daemon_pid=

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
