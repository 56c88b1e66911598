#!/usr/bin/env bash
# Start the MLflow tracking server for etbench sweeps on the Ray head node.
#
#   cluster/mlflow_server.sh                       # foreground, 127.0.0.1:5000 (reach it through an SSH tunnel)
#   cluster/mlflow_server.sh --daemon              # background; log and pid file in the store directory
#   cluster/mlflow_server.sh --stop                # stop the background server started with --daemon
#   cluster/mlflow_server.sh --expose --allowed-hosts "10.0.1.23:5000,10.0.1.23"   # other nodes can log to it
#
# Defaults are deliberately closed: it binds 127.0.0.1, runs one uvicorn worker and no job runner
# (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: ~10 s start and ~0.5 GB instead of ~40 s and ~2.5 GB). Trials on other
# nodes can only log to it once it is exposed, which needs --expose (binds 0.0.0.0) AND an explicit
# --allowed-hosts list (the Host headers MLflow accepts: DNS-rebinding protection). Keep port 5000 closed to the
# internet (security group / NetworkPolicy): the server has no authentication of its own.
#
# Options (or the environment variable in brackets):
#   --store DIR          [MLFLOW_STORE_DIR, default ~/etbench-mlflow]  sqlite database + proxied artifacts
#   --artifacts URI      [MLFLOW_ARTIFACTS, default DIR/artifacts]     e.g. s3://bucket/etbench or a shared mount
#   --port N             [MLFLOW_PORT, default 5000]
#   --expose             [MLFLOW_EXPOSE=1]                             bind 0.0.0.0 instead of 127.0.0.1
#   --allowed-hosts LIST [MLFLOW_ALLOWED_HOSTS]                        required with --expose
#   --daemon / --stop
# MLFLOW_BIN selects the mlflow executable (default: mlflow on PATH).
set -euo pipefail

STORE="${MLFLOW_STORE_DIR:-$HOME/etbench-mlflow}"
ARTIFACTS="${MLFLOW_ARTIFACTS:-}"
PORT="${MLFLOW_PORT:-5000}"
EXPOSE="${MLFLOW_EXPOSE:-0}"
ALLOWED="${MLFLOW_ALLOWED_HOSTS:-}"
MODE=foreground
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"

die() { echo "mlflow_server.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --store) STORE="${2:?--store needs a directory}"; shift 2 ;;
    --artifacts) ARTIFACTS="${2:?--artifacts needs a URI}"; shift 2 ;;
    --port) PORT="${2:?--port needs a number}"; shift 2 ;;
    --expose) EXPOSE=1; shift ;;
    --allowed-hosts) ALLOWED="${2:?--allowed-hosts needs a comma-separated list}"; shift 2 ;;
    --daemon) MODE=daemon; shift ;;
    --stop) MODE=stop; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (allowed: --store --artifacts --port --expose --allowed-hosts --daemon --stop)" ;;
  esac
done

[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
PIDFILE="$STORE/mlflow-server.pid"
LOG="$STORE/mlflow-server.log"

if [[ "$MODE" == stop ]]; then
  [[ -f "$PIDFILE" ]] || die "no pid file $PIDFILE (was it started with --daemon?)"
  PID="$(cat "$PIDFILE")"
  # the daemon runs in its own session, so its process group id is its pid: stop the server and its workers
  kill -TERM -- "-$PID" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$PID" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "stopped MLflow server (pid $PID)"
  exit 0
fi

HOST=127.0.0.1
EXTRA=()
if [[ "$EXPOSE" == 1 ]]; then
  [[ -n "$ALLOWED" ]] || die "--expose needs --allowed-hosts (or MLFLOW_ALLOWED_HOSTS), e.g. '10.0.1.23:5000,10.0.1.23'"
  HOST=0.0.0.0
fi
[[ -n "$ALLOWED" ]] && EXTRA+=(--allowed-hosts "$ALLOWED")

mkdir -p "$STORE"
STORE="$(cd "$STORE" && pwd)"
ARTIFACTS="${ARTIFACTS:-$STORE/artifacts}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

CMD=("$MLFLOW_BIN" server
     --backend-store-uri "sqlite:///$STORE/mlflow.db"
     --artifacts-destination "$ARTIFACTS"
     --host "$HOST" --port "$PORT" --workers 1 "${EXTRA[@]}")

echo "MLflow server: ${CMD[*]}" >&2
echo "tracking URI for etbench: http://<this host>:$PORT  (health: curl http://127.0.0.1:$PORT/health)" >&2
if [[ "$MODE" == daemon ]]; then
  setsid "${CMD[@]}" >"$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  echo "started in the background: pid $(cat "$PIDFILE"), log $LOG; stop with: $0 --store $STORE --stop" >&2
else
  exec "${CMD[@]}"
fi
