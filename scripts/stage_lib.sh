# Shared by scripts/demo.sh and scripts/experiment.sh (sourced, not run).
#   STAGE_TAG=demo; STAGE_T0=$(date +%s)
#   run_stage "title" LOG cmd args...   # one line naming the log, then the log's last progress line while it runs
# On failure: the log's last lines and the command's exit code. Each stage runs in a process group of its own,
# and an exit, Ctrl-C or kill of the script stops that whole group (a wrapper shell's children included).

STAGE_TAG="${STAGE_TAG:-rlt}"
STAGE_T0="${STAGE_T0:-$(date +%s)}"
STAGE_PID=""

stage_elapsed() { local s=$(( $(date +%s) - STAGE_T0 )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# The log's last progress line: the last \r-separated segment (tqdm bars) of its last non-empty line, squeezed.
stage_progress() {
  tail -c 6000 "$1" 2>/dev/null | tr '\r' '\n' | sed -e 's/\x1b\[[0-9;]*[A-Za-z]//g' -e 's/[[:space:]]\+/ /g' \
    | grep -a -v '^ *$' | tail -n 1 | cut -c 1-110 || true  # an empty log has no progress line yet
}

stage_exit() {  # any exit (an error in the caller included): stop the running stage's process group
  if [ -n "$STAGE_PID" ] && kill -0 "$STAGE_PID" 2>/dev/null; then
    kill -TERM -- "-$STAGE_PID" 2>/dev/null || true
    wait "$STAGE_PID" 2>/dev/null || true
  fi
}
stage_stop() {  # Ctrl-C / kill
  stage_exit
  echo
  echo "[$STAGE_TAG] interrupted"
  exit 130
}
trap stage_stop INT TERM
trap stage_exit EXIT

run_stage() {
  local title="$1" log="$2" rc=0 last="" now shown=0
  shift 2
  mkdir -p "$(dirname "$log")"
  echo "[$STAGE_TAG] $(stage_elapsed) | $title  (log: $log)"
  set -m  # job control: the stage leads a process group of its own (Ctrl-C reaches it through stage_stop)
  "$@" < /dev/null > "$log" 2>&1 &
  STAGE_PID=$!
  set +m
  while kill -0 "$STAGE_PID" 2>/dev/null; do
    sleep 3
    now="$(stage_progress "$log")"
    if [ -t 1 ]; then
      printf '\r\033[K    %s' "$now"
      shown=1
    elif [ -n "$now" ] && [ "$now" != "$last" ] && [ $(( $(date +%s) - ${STAGE_LAST_PRINT:-0} )) -ge 30 ]; then
      echo "    ... $now"
      STAGE_LAST_PRINT=$(date +%s)
    fi
    last="$now"
  done
  wait "$STAGE_PID" || rc=$?
  STAGE_PID=""
  [ "$shown" = 1 ] && printf '\r\033[K'
  if [ "$rc" != 0 ]; then
    echo "[$STAGE_TAG] $(stage_elapsed) | FAILED (exit code $rc): $title; the end of $log:"
    tail -n 25 "$log" | sed 's/^/    /'
    exit "$rc"
  fi
}
