#!/usr/bin/env bash
# Real test bed for muvee-agent's Docker end-to-end tests:
#   - a Docker engine (started here with iptables off, vfs storage: works in
#     sandboxes/VMs without a systemd-managed dockerd),
#   - a local base image muvee-test/busybox:latest (no Docker Hub access here),
#   - a registry on 127.0.0.1:5000 with htpasswd (bcrypt) basic auth.
# Usage: scripts/testbed.sh [up|down|env|check]
#   up     (default) idempotent; quiet except one summary line (TESTBED_VERBOSE=1 for more)
#   down   stop the dockerd/registry that `up` started
#   env    print `export` lines for the tests
#   check  smoke-test the bed and probe which docker CLI/builder combinations work
set -euo pipefail

STATE=/var/lib/muvee-testbed
LOGS=/var/log/muvee-testbed
REGISTRY=127.0.0.1:5000
REG_USER=muvee-test
REG_PASS=registry-pw-4c8e1f
BASE_IMAGE=muvee-test/busybox:latest
REG_IMAGE=$REGISTRY/$BASE_IMAGE
PKGS=(docker.io docker-compose docker-registry rsync busybox-static apache2-utils git curl ca-certificates strace)
DID=() # what this run had to do, for the summary line

say() { [ -z "${TESTBED_VERBOSE:-}" ] || echo "testbed: $*" >&2; }
die() { echo "testbed: ERROR: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
# alive PIDFILE: its process exists and is not a zombie (PID 1 here may reap late).
alive() { [ -s "$1" ] && ps -o stat= -p "$(cat "$1")" 2>/dev/null | grep -qv '^Z'; }

# wait_for SECONDS CMD...: poll CMD every 0.5 s until it succeeds.
wait_for() {
  local n=$(($1 * 2)); shift
  until "$@"; do n=$((n - 1)); [ "$n" -gt 0 ] || return 1; sleep 0.5; done
}

# --- packages ---------------------------------------------------------------
pkg_missing() {
  local p
  for p in "${PKGS[@]}"; do
    if command -v dpkg-query >/dev/null; then
      dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || echo "$p"
    else # not Debian: fall back to the commands we actually use
      case $p in
        docker.io) command -v dockerd >/dev/null || echo "$p" ;;
        busybox-static) command -v busybox >/dev/null || echo "$p" ;;
        apache2-utils) command -v htpasswd >/dev/null || echo "$p" ;;
        ca-certificates) ;;
        *) command -v "$p" >/dev/null || echo "$p" ;;
      esac
    fi
  done
}

ensure_packages() {
  local missing
  missing=$(pkg_missing | xargs)
  [ -n "$missing" ] || return 0
  if ! is_root || ! command -v apt-get >/dev/null; then
    echo "testbed: missing packages: $missing" >&2
    echo "testbed: cannot install them (needs root and apt-get); install them by hand and re-run." >&2
    exit 3
  fi
  say "installing $missing"
  mkdir -p "$LOGS"
  # shellcheck disable=SC2086 # word splitting of $missing is intended
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing; } \
    >"$LOGS/apt.log" 2>&1 || die "apt-get install $missing failed; see $LOGS/apt.log"
  DID+=("installed: $missing")
}

# --- docker engine ----------------------------------------------------------
docker_ok() { docker info >/dev/null 2>&1; }
dockerd_ready() { # PID: fail fast if that dockerd died instead of waiting 60 s
  docker_ok && return 0
  kill -0 "$1" 2>/dev/null || { tail -n 15 "$LOGS/dockerd.log" >&2; die "dockerd exited during start-up; see $LOGS/dockerd.log"; }
  return 1
}

ensure_dockerd() {
  if ! docker_ok; then
    is_root || die "no Docker engine answers and we are not root, so cannot start dockerd"
    mkdir -p "$STATE" "$LOGS"
    local f=$STATE/dockerd.pid pid
    if alive "$f"; then
      pid=$(cat "$f") # ours and still starting (or hung): wait, don't start a second one
    else
      # Stale pid files after a kill -9: dockerd refuses to start while /proc/<pid>
      # exists, and waits forever on a zombie containerd it thinks is alive.
      rm -f "$f"
      alive /run/docker/containerd/containerd.pid || rm -f /run/docker/containerd/containerd.pid
      say "starting dockerd"
      # setsid+nohup: detach from our session so it outlives make/CI shells;
      # all fds redirected so callers' pipes ($(...), CI logs) never hang on it.
      nohup setsid dockerd --iptables=false --storage-driver=vfs --pidfile "$f" \
        </dev/null >>"$LOGS/dockerd.log" 2>&1 &
      pid=$!
      DID+=("started dockerd")
    fi
    wait_for 60 dockerd_ready "$pid" ||
      { tail -n 15 "$LOGS/dockerd.log" >&2; die "dockerd (pid $pid) did not answer within 60 s; see $LOGS/dockerd.log"; }
  fi
  # Both CLIs on this machine (Debian 20.10 and a newer one in /usr/local/bin)
  # must reach the engine; the 28.x client negotiates down to the 20.10 API.
  local c
  for c in $(type -ap docker | xargs -n1 readlink -f | sort -u); do
    "$c" version >/dev/null 2>&1 || die "$c cannot talk to the Docker engine ($("$c" version 2>&1 | tail -n1))"
  done
}

# --- base image ---------------------------------------------------------------
ensure_base_image() {
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  local bb root a
  bb=$(command -v busybox) || die "busybox not found (package busybox-static)"
  ldd "$bb" >/dev/null 2>&1 && die "$bb is dynamically linked; install busybox-static"
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,etc,root,tmp,var/www,usr/bin}
  chmod 1777 "$root/tmp"
  cp "$bb" "$root/bin/busybox"
  for a in $("$bb" --list); do [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"; done
  ln -s /bin/env "$root/usr/bin/env" # for `#!/usr/bin/env sh` scripts
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["sh"]' - "$BASE_IMAGE" >/dev/null || { rm -rf "$root"; die "docker import of $BASE_IMAGE failed"; }
  rm -rf "$root"
  DID+=("built $BASE_IMAGE")
}

# --- registry -----------------------------------------------------------------
reg_code() { curl -s -o /dev/null -m 3 -w '%{http_code}' "$@" || true; }
# With the registry password from a config on stdin, never in argv (tests sample every
# process's argv for secrets, this script's included).
reg_code_auth() { printf 'user = "%s:%s"\n' "$REG_USER" "$REG_PASS" | reg_code -K - "$@"; }
registry_ok() {
  [ "$(reg_code "http://$REGISTRY/v2/")" = 401 ] &&
    [ "$(reg_code_auth "http://$REGISTRY/v2/")" = 200 ]
}

write_registry_config() {
  mkdir -p "$STATE/registry" "$LOGS"
  # -B: bcrypt, the only hash registry accepts; -i: the password from stdin, not argv
  echo "$REG_PASS" | htpasswd -Bic "$STATE/htpasswd" "$REG_USER" 2>/dev/null
  # A fixed http secret avoids the "generated random secret" warning and keeps
  # resumable uploads valid across restarts.
  [ -s "$STATE/http-secret" ] || od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$STATE/http-secret"
  cat >"$STATE/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
  secret: $(cat "$STATE/http-secret")
auth:
  htpasswd:
    realm: muvee-testbed
    path: $STATE/htpasswd
EOF
}

ensure_registry() {
  registry_ok && return 0
  is_root || die "registry on $REGISTRY is not answering as expected and we are not root"
  alive "$STATE/registry.pid" && { kill "$(cat "$STATE/registry.pid")"; sleep 1; } # ours, but misconfigured
  if [ "$(reg_code "http://$REGISTRY/v2/")" != 000 ]; then
    # Debian's docker-registry package ships a service on :5000 without our auth.
    if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
      say "stopping Debian's docker-registry service (it holds port 5000)"
      systemctl disable --now docker-registry >/dev/null 2>&1 || true
    else
      die "something else listens on $REGISTRY (GET /v2/ -> $(reg_code "http://$REGISTRY/v2/")); stop it first"
    fi
  fi
  write_registry_config
  say "starting registry on $REGISTRY"
  nohup setsid docker-registry serve "$STATE/registry.yml" </dev/null >>"$LOGS/registry.log" 2>&1 &
  echo $! >"$STATE/registry.pid"
  wait_for 20 registry_ok ||
    { tail -n 15 "$LOGS/registry.log" >&2; die "registry did not answer 401/200 on http://$REGISTRY/v2/; see $LOGS/registry.log"; }
  DID+=("started registry")
}

# with_login CMD...: run CMD with a throw-away DOCKER_CONFIG logged in to the
# registry, so no credentials end up in ~/.docker.
with_login() {
  local cfg rc=0
  cfg=$(mktemp -d)
  if echo "$REG_PASS" | DOCKER_CONFIG=$cfg docker login "$REGISTRY" -u "$REG_USER" --password-stdin >/dev/null 2>&1; then
    DOCKER_CONFIG=$cfg "$@" || rc=$?
    DOCKER_CONFIG=$cfg docker logout "$REGISTRY" >/dev/null 2>&1 || true
  else
    rc=1; echo "testbed: docker login $REGISTRY failed" >&2
  fi
  rm -rf "$cfg"
  return $rc
}

ensure_registry_image() {
  local code
  code=$(reg_code_auth -I \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$REGISTRY/v2/${BASE_IMAGE%:*}/manifests/${BASE_IMAGE##*:}")
  # Re-push when the local image was just rebuilt, so both stay identical.
  [ "$code" = 200 ] && [[ " ${DID[*]} " != *" built "* ]] && return 0
  docker tag "$BASE_IMAGE" "$REG_IMAGE"
  with_login docker push -q "$REG_IMAGE" >/dev/null || die "docker push $REG_IMAGE failed"
  DID+=("pushed $REG_IMAGE")
}

# --- smoke test ---------------------------------------------------------------
# Runs the base image and serves HTTP through a published port. With iptables
# off, docker-proxy (userland proxy) does the host-port forwarding.
smoke() {
  local out cid port body=""
  out=$(docker run --rm "$BASE_IMAGE" echo ok 2>&1) || true
  [ "$out" = ok ] || die "docker run $BASE_IMAGE echo ok printed: $out"
  cid=$(docker run -d --rm -p 0:8080 "$BASE_IMAGE" \
    sh -c 'echo muvee-testbed-ok >/var/www/index.html; exec httpd -f -p 8080 -h /var/www') ||
    die "could not start httpd container"
  port=$(docker port "$cid" 8080/tcp | head -n1 | sed 's/.*://')
  for _ in $(seq 20); do
    body=$(curl -s -m 2 "http://127.0.0.1:$port/" || true)
    [ "$body" = muvee-testbed-ok ] && break
    sleep 0.25
  done
  docker rm -f "$cid" >/dev/null 2>&1 || true # (httpd ignores SIGTERM as PID 1)
  [ "$body" = muvee-testbed-ok ] || die "published port 127.0.0.1:$port did not serve the httpd container (got '$body')"
  registry_ok || die "registry http://$REGISTRY/v2/ does not answer 401 without and 200 with credentials"
  with_login true || die "docker login $REGISTRY -u $REG_USER failed"
}

cmd_up() {
  ensure_packages
  ensure_dockerd
  ensure_base_image
  ensure_registry
  ensure_registry_image
  # Full smoke test only when something changed: keeps a no-op `up` fast.
  if [ ${#DID[@]} -gt 0 ] || [ -n "${TESTBED_VERIFY:-}" ]; then smoke; fi
  local what="already running"
  if [ ${#DID[@]} -gt 0 ]; then what=$(printf '%s, ' "${DID[@]}"); what=${what%, }; fi
  echo "testbed: up (docker $(docker version -f '{{.Server.Version}}'), registry $REGISTRY as $REG_USER, image $BASE_IMAGE): $what"
}

cmd_down() {
  local f name stopped=0
  for name in registry dockerd; do
    f=$STATE/$name.pid
    if alive "$f"; then
      kill "$(cat "$f")"
      wait_for 30 eval "! kill -0 $(cat "$f") 2>/dev/null" || die "$name (pid $(cat "$f")) did not stop"
      echo "testbed: stopped $name"; stopped=1
    fi
    rm -f "$f"
  done
  [ $stopped = 1 ] || echo "testbed: nothing to stop (no dockerd/registry started by testbed.sh is running)"
}

cmd_env() {
  cat <<EOF
export MUVEE_TEST_REGISTRY=$REGISTRY
export MUVEE_TEST_REGISTRY_USER=$REG_USER
export MUVEE_TEST_REGISTRY_PASSWORD=$REG_PASS
export MUVEE_TEST_BASE_IMAGE=$BASE_IMAGE
EOF
}

# probe LABEL CMD...: run CMD, print one result line with its key message.
probe() {
  local label=$1 out rc=0 msg; shift
  out=$("$@" 2>&1) || rc=$?
  if [ $rc = 0 ]; then
    msg=ok; [[ $out != *DEPRECATED* ]] || msg="ok (prints: DEPRECATED: The legacy builder is deprecated...)"
  else
    msg=$(echo "$out" | grep -m1 -iE 'error|requires|unknown|not a docker command' || echo "$out" | tail -n1)
    msg="FAIL rc=$rc: $msg"
  fi
  printf '  %-62s %s\n' "$label" "$msg"
}

cmd_check() {
  cmd_up
  smoke && echo "  smoke: run + httpd via published port (docker-proxy): ok"
  local d c ver before
  before=$(docker images -q -f dangling=true)
  d=$(mktemp -d)
  # No `# syntax=` line: it would make BuildKit pull a frontend image.
  # shellcheck disable=SC2016 # $(cat ...) is for the container's shell
  printf 'FROM %s\nRUN --mount=type=secret,id=tok test "$(cat /run/secrets/tok)" = s3cret\n' "$BASE_IMAGE" >"$d/Dockerfile.secret"
  printf 'FROM %s\nRUN echo plain\n' "$BASE_IMAGE" >"$d/Dockerfile.plain"
  printf 'FROM %s\nRUN echo from-registry\n' "$REG_IMAGE" >"$d/Dockerfile.registry"
  printf s3cret >"$d/tok"
  for c in $(type -ap docker | xargs -n1 readlink -f | sort -u); do
    ver=$("$c" version -f '{{.Client.Version}}' 2>/dev/null || echo '?')
    echo "$c (client $ver):"
    probe "buildx plugin (docker buildx version)" "$c" buildx version
    probe "build, plain Dockerfile (DOCKER_BUILDKIT unset)" env -u DOCKER_BUILDKIT "$c" build -q -f "$d/Dockerfile.plain" "$d"
    probe "DOCKER_BUILDKIT=0 build, plain" env DOCKER_BUILDKIT=0 "$c" build -q -f "$d/Dockerfile.plain" "$d"
    probe "DOCKER_BUILDKIT=1 build, plain" env DOCKER_BUILDKIT=1 "$c" build -q -f "$d/Dockerfile.plain" "$d"
    probe "DOCKER_BUILDKIT=1 build --secret + RUN --mount=type=secret" env DOCKER_BUILDKIT=1 "$c" build -q --no-cache \
      --secret id=tok,src="$d/tok" -f "$d/Dockerfile.secret" "$d"
    probe "DOCKER_BUILDKIT=0 build --secret, plain Dockerfile" env DOCKER_BUILDKIT=0 "$c" build -q \
      --secret id=tok,src="$d/tok" -f "$d/Dockerfile.plain" "$d"
    probe "DOCKER_BUILDKIT=0 build, RUN --mount=type=secret" env DOCKER_BUILDKIT=0 "$c" build -q -f "$d/Dockerfile.secret" "$d"
    docker rmi "$REG_IMAGE" >/dev/null 2>&1 || true # force a real pull
    probe "DOCKER_BUILDKIT=1 build FROM $REGISTRY (logged in)" with_login env DOCKER_BUILDKIT=1 "$c" build -q --no-cache \
      -f "$d/Dockerfile.registry" "$d"
    docker rmi "$REG_IMAGE" >/dev/null 2>&1 || true
    probe "DOCKER_BUILDKIT=0 build FROM $REGISTRY (logged in)" with_login env DOCKER_BUILDKIT=0 "$c" build -q --no-cache \
      -f "$d/Dockerfile.registry" "$d"
    docker rmi "$REG_IMAGE" >/dev/null 2>&1 || true
    probe "DOCKER_BUILDKIT=0 build FROM $REGISTRY (NOT logged in)" env DOCKER_BUILDKIT=0 DOCKER_CONFIG="$d" "$c" build -q \
      --no-cache -f "$d/Dockerfile.registry" "$d"
  done
  rm -rf "$d"
  docker tag "$BASE_IMAGE" "$REG_IMAGE"
  # Drop the probe images (only the dangling ones this run created).
  comm -13 <(echo "$before" | sort) <(docker images -q -f dangling=true | sort) | xargs -r docker rmi -f >/dev/null 2>&1 || true
}

case ${1:-up} in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  check) cmd_check ;;
  *) echo "usage: $0 [up|down|env|check]" >&2; exit 2 ;;
esac
