#!/bin/sh
# A stand-in for `claude -p` in the benchmarks (POSIX sh, no Python start-up to measure).
# Records when it starts and ends (ns since the epoch, CLOCK_REALTIME) in
# $CLAUDE_CONFIG_DIR/bench-stamps/<session id>.start and .end, then answers with one result line at once,
# or after S seconds when the message is exactly `sleep=S`. With BENCH_REAL_CLAUDE set it runs that binary
# (the real CLI) between the two stamps instead of answering itself.
start=$(date +%s%N)
session=unknown
prev=""
msg=""
for arg in "$@"; do
    case $prev in --session-id | --resume) session=$arg ;; esac
    prev=$arg
    msg=$arg
done
dir=${CLAUDE_CONFIG_DIR:-/tmp}/bench-stamps
[ -d "$dir" ] || mkdir -p "$dir"
echo "$start" >"$dir/$session.start"
if [ -n "${BENCH_REAL_CLAUDE:-}" ]; then
    "$BENCH_REAL_CLAUDE" "$@"
    rc=$?
else
    case $msg in sleep=*) sleep "${msg#sleep=}" ;; esac
    printf '{"type":"result","subtype":"success","is_error":false,"duration_ms":0,"num_turns":1,'
    printf '"result":"stub reply","session_id":"%s"}\n' "$session"
    rc=0
fi
date +%s%N >"$dir/$session.end"
exit $rc
