#!/usr/bin/env bash
# `make demo` (scripts/demo.sh up) / `make demo-down` (scripts/demo.sh down).
#
# up: the agent's real loop on this machine. Brings up the local test bed (Docker engine +
# password-protected registry) if it is not up, builds the agent and the dev control plane
# (examples/dev-cp), starts the dev control plane and two long-lived agents (builder and
# deploy) in the background with their logs in files, pushes examples/sample-app from a local
# git repository through build → deploy with a dependency dataset, waits until the app
# answers, and prints its URL. Idempotent: what already runs (recorded PIDs) is reused; a
# second run pushes a new commit and redeploys it without downtime.
#
# down: stops what `up` started, by the PIDs it recorded (never by name), removes the app's
# container, and leaves the test bed up.
set -euo pipefail
cd "$(dirname "$0")/.."

work=${DEMO_DIR:-$PWD/target/demo}
pids=$work/pids
logs=$work/logs
secret=demo-agent-secret
prefix=demo
agent=$PWD/target/release/muvee-agent
dev_cp=$PWD/target/release/examples/dev-cp

t0=$(date +%s%N)
n=0
step() {
  n=$((n + 1))
  step_t=$(date +%s%N)
  printf '[%d] %s\n' "$n" "$*"
}
took() { # prints the time since the step began
  local ns=$(($(date +%s%N) - step_t))
  printf '    ok (%d.%01ds)%s\n' $((ns / 1000000000)) $((ns / 100000000 % 10)) "${1:+ $1}"
}

# ours PID EXE: the process exists, is not a zombie, and runs EXE, or a previous build of it
# that cargo has since replaced (a recycled PID runs something else).
ours() {
  [ -n "$1" ] && [ "$1" -gt 0 ] 2>/dev/null || return 1
  [ -r "/proc/$1/stat" ] || return 1
  [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ] || return 1
  local exe
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  [ "$exe" = "$2" ] || [ "$exe" = "$2 (deleted)" ]
}
# alive PID EXE: ours, and running the current build (so it can be reused).
alive() { ours "$1" "$2" && [ "$(readlink "/proc/$1/exe")" = "$2" ]; }
pid_of() { cat "$pids/$1.pid" 2>/dev/null || true; }

# start NAME EXE ARGS...: run in the background in its own session, output in logs/NAME.log.
start() {
  local name=$1
  shift
  setsid "$@" </dev/null >>"$logs/$name.log" 2>&1 &
  echo $! >"$pids/$name.pid"
}

# stop NAME EXE: SIGTERM by recorded PID, wait, SIGKILL if it is still there. Only positive
# PIDs, only the shell's `kill` builtin (procps' kill(1) turns some negative PIDs into -1).
stop() {
  local name=$1 exe=$2 pid
  pid=$(pid_of "$name")
  if ours "$pid" "$exe"; then
    builtin kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do ours "$pid" "$exe" || break; sleep 0.1; done
    if ours "$pid" "$exe"; then
      echo "    $name ($pid) ignored SIGTERM for 30 s: SIGKILL"
      builtin kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 50); do ours "$pid" "$exe" || break; sleep 0.1; done
    fi
    echo "    stopped $name (pid $pid)"
  fi
  rm -f "$pids/$name.pid"
}

app_containers() {
  docker ps -aq --filter "label=muvee.domain_prefix=$prefix" 2>/dev/null || true
  docker ps -aq --filter "name=^muvee-$prefix\$" 2>/dev/null || true
}

down() {
  step "stop what the demo started (PIDs in $pids)"
  stop agent-deploy "$agent"
  stop agent-builder "$agent"
  stop dev-cp "$dev_cp"
  took
  step "remove the app container (muvee-$prefix)"
  local ids
  ids=$(app_containers | sort -u)
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    docker rm -f $ids >/dev/null
  fi
  took
  rm -f "$work/url"
  echo "The test bed (Docker engine, registry) stays up: scripts/testbed.sh down stops it."
}

cp_call() { DEV_CP_URL=$cp_url "$dev_cp" "$@"; }

up() {
  mkdir -p "$pids" "$logs"

  step "test bed: Docker engine + registry (scripts/testbed.sh up)"
  scripts/testbed.sh up >"$logs/testbed.log" 2>&1 || { cat "$logs/testbed.log" >&2; exit 1; }
  eval "$(scripts/testbed.sh env)"
  took "registry $MUVEE_TEST_REGISTRY"

  step "build the agent and the dev control plane (cargo build --release)"
  # A rebuilt binary would not match the running processes' exe: reuse means same binary.
  cargo build --release --locked --quiet --bin muvee-agent --example dev-cp
  took

  step "dev control plane (examples/dev-cp)"
  mkdir -p "$work/nfs/datasets/words"
  printf 'hello from the words dataset\n' >"$work/nfs/datasets/words/hello.txt"
  local note=reused
  alive "$(pid_of dev-cp)" "$dev_cp" || stop dev-cp "$dev_cp" # a previous build's
  if ! alive "$(pid_of dev-cp)" "$dev_cp"; then
    rm -f "$work/cp.port"
    start dev-cp "$dev_cp" serve --listen 127.0.0.1:0 --port-file "$work/cp.port" \
      --secret "$secret" --chain-interval-ms 1000 \
      --registry "$MUVEE_TEST_REGISTRY" --registry-user "$MUVEE_TEST_REGISTRY_USER" \
      --registry-password "$MUVEE_TEST_REGISTRY_PASSWORD" \
      --dataset-nfs-base-path "$work/nfs/datasets" --volume-nfs-base-path "$work/nfs/volumes"
    for _ in $(seq 100); do [ -s "$work/cp.port" ] && break; sleep 0.05; done
    [ -s "$work/cp.port" ] || { cat "$logs/dev-cp.log" >&2; exit 1; }
    note=started
  fi
  cp_url=http://127.0.0.1:$(cat "$work/cp.port")
  took "$note, pid $(pid_of dev-cp), $cp_url"

  step "agents: builder and deploy, long-lived, polling the dev control plane"
  local role notes=()
  for role in builder deploy; do
    if alive "$(pid_of "agent-$role")" "$agent" && [ "$note" = reused ]; then
      notes+=("$role reused (pid $(pid_of "agent-$role"))")
      continue
    fi
    # A previous build's agent, or one registered with a dev control plane that is gone.
    stop "agent-$role" "$agent"
    mkdir -p "$work/$role"
    start "agent-$role" env NODE_ROLE=$role CONTROL_PLANE_URL="$cp_url" AGENT_SECRET=$secret \
      NODE_NAME=demo-$role HOST_IP=127.0.0.1 DATA_DIR="$work/$role" POLL_INTERVAL=1s \
      DOCKER_CONFIG="$work/$role/docker-config" DEPLOY_DRAIN=1s SHUTDOWN_GRACE=20s \
      "$agent"
    notes+=("$role started (pid $(pid_of "agent-$role"))")
  done
  # `env` execs the agent: the recorded PID is the agent's.
  for _ in $(seq 200); do
    local nodes
    nodes=$(cp_call nodes 2>/dev/null || true)
    if grep -q '"demo-builder"' <<<"$nodes" && grep -q '"demo-deploy"' <<<"$nodes"; then break; fi
    sleep 0.1
  done
  grep -q '"demo-deploy"' <<<"$(cp_call nodes)" || {
    echo "the agents did not register; see $logs" >&2
    tail -n 20 "$logs"/agent-*.log >&2
    exit 1
  }
  took "${notes[*]}; both registered"

  step "push examples/sample-app to a local git repository"
  rm -rf "$work/repo"
  cp -r examples/sample-app "$work/repo"
  printf '<p>deployed by muvee-agent at %s</p>\n' "$(date -u +%FT%TZ)" >>"$work/repo/index.html"
  git -C "$work/repo" init -q -b main
  git -C "$work/repo" -c user.name=demo -c user.email=demo@localhost add -A
  git -C "$work/repo" -c user.name=demo -c user.email=demo@localhost commit -qm "sample app"
  took "file://$work/repo @ $(git -C "$work/repo" rev-parse --short HEAD)"

  step "enqueue a build (the dev control plane chains it into a deploy with dataset 'words')"
  local out dep
  out=$(cp_call build "file://$work/repo" --prefix "$prefix" --memory 256m \
    --dataset words=words@1 --env GREETING=hello)
  dep=$(sed -n 's/.*"deployment_id":"\([^"]*\)".*/\1/p' <<<"$out")
  [ -n "$dep" ] || { echo "enqueue failed: $out" >&2; exit 1; }
  echo "$dep" >"$work/deployment"
  took "deployment $dep"

  step "wait: builder clones, builds, pushes; deploy node syncs the dataset, runs, health-checks"
  local status="" port="" deadline=$((SECONDS + 240)) row seen=""
  while [ $SECONDS -lt $deadline ]; do
    row=$(cp_call deployments | tr -d '\n ' | grep -o "{[^{}]*\"id\":\"$dep\"[^{}]*}" || true)
    status=$(sed -n 's/.*"status":"\([^"]*\)".*/\1/p' <<<"$row")
    if [ "$status" != "$seen" ]; then
      printf '    deployment %s (%ss)\n' "$status" "$(( ($(date +%s%N) - step_t) / 1000000000 ))"
      seen=$status
    fi
    case $status in
      running) port=$(sed -n 's/.*"host_port":\([0-9]*\).*/\1/p' <<<"$row"); break ;;
      failed)
        echo "the deployment failed; its log:" >&2
        cp_call logs "$dep" >&2
        exit 1
        ;;
    esac
    sleep 0.5
  done
  [ -n "$port" ] || { echo "timed out (status ${status:-none}); logs in $logs" >&2; exit 1; }
  took "host port $port"

  step "the app answers"
  local url=http://127.0.0.1:$port/
  for _ in $(seq 100); do curl -fs -o /dev/null "$url" && break; sleep 0.1; done
  curl -fsS "$url" | sed 's/^/    | /'
  local data
  data=$(docker exec "muvee-$prefix" cat /data/words/hello.txt 2>/dev/null || echo "(not readable)")
  echo "    dataset 'words' mounted read-only at /data/words: $data"
  echo "$url" >"$work/url"
  took

  local total=$((($(date +%s%N) - t0) / 1000000000))
  cat <<EOF

Sample app: $url   (container muvee-$prefix, deployment $dep; ${total}s in all)

Logs:       $logs/dev-cp.log, agent-builder.log, agent-deploy.log
Build/deploy log as the control plane stored it:
            DEV_CP_URL=$cp_url $dev_cp logs $dep
Tasks on the dev control plane ($cp_url):
EOF
  cp_call tasks | sed 's/^/  /'
  local role
  for role in builder deploy; do
    echo "Last lines of agent-$role.log:"
    tail -n 3 "$logs/agent-$role.log" | sed 's/^/  /'
  done
  cat <<EOF

Again:      make demo        (reuses what runs; builds and redeploys a new commit)
Stop:       make demo-down   (stops the dev control plane and both agents, removes the app;
                              the test bed stays up)
EOF
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  *)
    echo "usage: $0 [up|down]" >&2
    exit 2
    ;;
esac
