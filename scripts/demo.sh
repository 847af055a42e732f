#!/usr/bin/env bash
# `make demo`: the agent's main job on this machine, end to end. Brings up the local test bed
# (Docker engine + password-protected registry), builds the agent, then runs a real build task
# (clone examples/sample-app from a local git repo, build, push) and a real deploy task (run
# it as muvee-demo, health-check it) through `muvee-agent run-task`, and prints the app's URL.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/testbed.sh up
eval "$(scripts/testbed.sh env)"
cargo build --release --locked --quiet
agent=$PWD/target/release/muvee-agent

work=${DEMO_DIR:-$PWD/target/demo}
rm -rf "$work/repo"
mkdir -p "$work/data"
export DATA_DIR=$work/data DOCKER_CONFIG=$work/docker-config
export REGISTRY_PASSWORD=$MUVEE_TEST_REGISTRY_PASSWORD

# The sample app as a git repository, as a user would push it.
cp -r examples/sample-app "$work/repo"
git -C "$work/repo" init -q -b main
git -C "$work/repo" -c user.name=demo -c user.email=demo@localhost add -A
git -C "$work/repo" -c user.name=demo -c user.email=demo@localhost commit -qm "sample app"

project=0d3e0000-0000-4000-8000-000000000001
deployment=de000000-0000-4000-8000-000000000001

echo "==> build: clone, build, push to $MUVEE_TEST_REGISTRY"
build=$(printf '{"git_url":"file://%s","git_branch":"main","dockerfile_path":"Dockerfile","deployment_id":"%s","project_id":"%s","domain_prefix":"demo"}' \
  "$work/repo" "$deployment" "$project")
result=$(echo "$build" | NODE_ROLE=builder "$agent" run-task --type build \
  --registry-addr "$MUVEE_TEST_REGISTRY" --registry-user "$MUVEE_TEST_REGISTRY_USER")
echo "    $result"
image=$(echo "$result" | sed -n 's/.*"image_tag":"\([^"]*\)".*/\1/p')
[ -n "$image" ] || { echo "build did not report an image tag" >&2; exit 1; }

echo "==> deploy: $image as muvee-demo"
deploy=$(printf '{"image_tag":"%s","deployment_id":"%s","project_id":"%s","domain_prefix":"demo","container_port":8080,"memory_limit":"256m","datasets":null,"env_vars":{"GREETING":"hello"}}' \
  "$image" "$deployment" "$project")
result=$(echo "$deploy" | NODE_ROLE=deploy DEPLOY_DRAIN=1s "$agent" run-task --type deploy \
  --registry-addr "$MUVEE_TEST_REGISTRY" --registry-user "$MUVEE_TEST_REGISTRY_USER")
echo "    $result"
port=$(echo "$result" | sed -n 's/.*"host_port":\([0-9]*\).*/\1/p')
[ -n "$port" ] || { echo "deploy did not report a host port" >&2; exit 1; }

url="http://127.0.0.1:$port/"
echo "==> $url answers:"
curl -fsS "$url"
echo
echo "Sample app running at $url (container muvee-demo; remove it with: docker rm -f muvee-demo)"
