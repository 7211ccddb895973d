#!/usr/bin/env bash
# The local byteify stack: Prefect server (UI) + a worker for the byteify-local pool +
# MLflow server (SQLite) [+ moto S3 with WITH_S3=1]. Started and stopped by PID; logs,
# PIDs and data under var/ (BYTEIFY_VAR). Usage: deployments/stack.sh up|down|status|env
#
#   make up
#   eval "$(deployments/stack.sh env)"     # the venv's tools on PATH, pointed at this stack
#   prefect deployment run byteify/tiny --watch
#   make down
#
# Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000), S3_PORT (5111).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR="${BYTEIFY_VAR:-$ROOT/var}"
BIN="${BYTEIFY_BIN:-$ROOT/.venv/bin}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
S3_PORT="${S3_PORT:-5111}"
POOL="${BYTEIFY_POOL:-byteify-local}"
WITH_S3="${WITH_S3:-0}"
mkdir -p "$VAR/logs" "$VAR/pids" "$VAR/prefect" "$VAR/mlflow"

# Everything the servers, the worker and the flow runs it starts share.
export PREFECT_HOME="$VAR/prefect"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false          # no internet: its telemetry call kills --background
export PREFECT_LOCAL_STORAGE_PATH="$VAR/prefect/results"
export PREFECT_RESULTS_PERSIST_BY_DEFAULT=true
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-2}"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false        # ~0.5 GB instead of ~2.4 GB (M1)
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false      # no download bars in logs or when loading a model
export BYTEIFY_STORAGE_ROOT="${BYTEIFY_STORAGE_ROOT:-$VAR/runs}"
export BYTEIFY_ROOT="$ROOT"
if [[ "$WITH_S3" == 1 ]]; then
  export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
  export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
fi

alive() { [[ -f "$VAR/pids/$1.pid" ]] && kill -0 "$(cat "$VAR/pids/$1.pid")" 2>/dev/null; }

start() {  # name, health URL, command...
  local name=$1 url=$2; shift 2
  if alive "$name"; then echo "$name: already running (pid $(cat "$VAR/pids/$name.pid"))"; return; fi
  # setsid: its own process group, so `down` stops the server and its children together.
  setsid nohup "$@" >"$VAR/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$VAR/pids/$name.pid"
  [[ -z "$url" ]] && { echo "$name: started (pid $!)"; return; }
  for _ in $(seq 1 240); do
    if curl -sf "$url" >/dev/null 2>&1; then echo "$name: up at ${url%/api/health} (pid $!)"; return; fi
    alive "$name" || { echo "$name: exited; see $VAR/logs/$name.log" >&2; tail -20 "$VAR/logs/$name.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "$name: not healthy after 120 s; see $VAR/logs/$name.log" >&2; exit 1
}

stop() {  # name [grace seconds]: SIGTERM the process group, SIGKILL what is left after the grace
  local name=$1 grace=${2:-20} pid
  alive "$name" || { rm -f "$VAR/pids/$name.pid"; return; }
  pid=$(cat "$VAR/pids/$name.pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 $((grace * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$VAR/pids/$name.pid"
  echo "$name: stopped"
}

up() {
  if [[ "$WITH_S3" == 1 ]]; then
    start s3 "http://127.0.0.1:$S3_PORT/moto-api/" "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    "$BIN/python" -c "import boto3; c = boto3.client('s3'); [c.create_bucket(Bucket=b) for b in ('byteify', 'mlflow') if b not in [x['Name'] for x in c.list_buckets().get('Buckets', [])]]"
    art="s3://mlflow/artifacts"
  else
    art="$VAR/mlflow/artifacts"
  fi
  start prefect-server "http://127.0.0.1:$PREFECT_PORT/api/health" \
    "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  start mlflow "http://127.0.0.1:$MLFLOW_PORT/health" \
    "$BIN/mlflow" server --backend-store-uri "sqlite:///$VAR/mlflow/mlflow.db" --artifacts-destination "$art" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 || "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
  "$BIN/prefect" work-pool inspect byteify-gpu >/dev/null 2>&1 || "$BIN/prefect" work-pool create byteify-gpu --type process >/dev/null
  (cd "$ROOT" && "$BIN/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml >"$VAR/logs/deploy.log" 2>&1) \
    || { echo "deploy failed; see $VAR/logs/deploy.log" >&2; tail -20 "$VAR/logs/deploy.log" >&2; exit 1; }
  echo "deployments: $(grep -oE "byteify(-[a-z]+)?/[a-z0-9.-]*" "$VAR/logs/deploy.log" | sort -u | tr '\n' ' ')"
  start worker "" "$BIN/prefect" worker start --pool "$POOL" --type process
  echo
  echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT    MLflow UI: http://127.0.0.1:$MLFLOW_PORT"
  echo "Run one:    eval \"\$(deployments/stack.sh env)\"; prefect deployment run byteify/tiny --watch"
}

down() {
  # Workers first (without a server they ignore SIGTERM). Prefect 3.9's `prefect worker start`
  # turns SIGTERM into a SIGINT whose graceful shutdown never ends (its cancelled main task
  # hangs), so the worker gets 3 s: flow runs it started share its process group and get
  # the same SIGTERM, which Prefect's engine handles itself (the run ends Crashed and its
  # on_crashed hook ends the MLflow runs).
  stop worker 3
  stop mlflow
  stop prefect-server
  stop s3
}

status() {
  for n in prefect-server mlflow worker s3; do
    if alive "$n"; then echo "$n: running (pid $(cat "$VAR/pids/$n.pid"))"; else echo "$n: stopped"; fi
  done
}

env_() {
  echo "export PATH=\"$BIN:\$PATH\""   # prefect, mlflow, byteify: the project's own venv
  for v in PREFECT_HOME PREFECT_API_URL PREFECT_SERVER_ANALYTICS_ENABLED MLFLOW_TRACKING_URI \
           MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR BYTEIFY_STORAGE_ROOT; do
    echo "export $v=\"${!v}\""
  done
  if [[ "$WITH_S3" == 1 ]]; then
    for v in AWS_ENDPOINT_URL MLFLOW_S3_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION; do
      echo "export $v=\"${!v}\""
    done
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) env_ ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
