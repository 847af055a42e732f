# muvee-agent build, test and install plumbing.  `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=
MUSL_TARGET := x86_64-unknown-linux-musl
STATIC_BIN := target/$(MUSL_TARGET)/release/muvee-agent
MAN_PAGE := man/muvee-agent.1

# cargo serialises on its own lock anyway; keep `make ci` steps in order under -j.
.NOTPARALLEL:
.PHONY: all help build static test lint man-check ci bench demo demo-down chaos chaos-ci install install-data clean

# $(call need,COMMAND,DEBIAN_PACKAGE): install the package when COMMAND is
# missing, but only as root with apt-get; otherwise fail with a clear message.
need = command -v $(1) >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian package $(2) (for $(1))"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2); } >/dev/null; \
	else echo "error: $(1) not found; install the Debian package $(2)" >&2; exit 1; fi

all: build

help:
	@echo "targets: build static test lint man-check ci bench demo demo-down chaos chaos-ci install install-data clean"
	@echo "  chaos: fault campaign, SEED=<n> (several: SEED=\"1 2 3\"; default random) DURATION=3m"
	@echo "  test: brings up scripts/testbed.sh (Docker + registry) first; MUVEE_REQUIRE_DOCKER=1 makes a missing test bed fatal"
	@echo "  install: PREFIX=$(PREFIX) DESTDIR=$(DESTDIR)"

build:
	$(CARGO) build --release --locked

# Fully static musl binary: one file to copy onto any Linux node.
static:
	@rustup target list --installed | grep -qx $(MUSL_TARGET) || rustup target add $(MUSL_TARGET)
	@$(call need,musl-gcc,musl-tools)
	@$(call need,file,file)
	$(CARGO) build --release --locked --target $(MUSL_TARGET)
	@file -L $(STATIC_BIN) | grep -Eq 'statically linked|static-pie linked' || \
	  { file -L $(STATIC_BIN) >&2; echo "error: $(STATIC_BIN) is not statically linked" >&2; exit 1; }
	@echo "static binary: $(STATIC_BIN) ($$(stat -c %s $(STATIC_BIN)) bytes)"

# The Docker end-to-end tests need the test bed.  If it cannot come up they
# skip loudly, unless MUVEE_REQUIRE_DOCKER=1 (CI), where that is an error.
# testbed.sh refuses by itself to install/start anything when not root.
test:
	@if out=$$(scripts/testbed.sh up 2>&1); then \
	  echo "$$out"; eval "$$(scripts/testbed.sh env)"; \
	else \
	  echo "$$out" >&2; \
	  if [ "$${MUVEE_REQUIRE_DOCKER:-}" = 1 ]; then \
	    echo "error: the Docker test bed did not come up and MUVEE_REQUIRE_DOCKER=1" >&2; exit 1; \
	  fi; \
	  line='!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'; \
	  printf '\n%s\n!!! Docker end-to-end tests will be SKIPPED: %s\n%s\n\n' \
	    "$$line" "$$(echo "$$out" | tail -n1)" "$$line" >&2; \
	fi; \
	$(CARGO) test --locked

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# The man page must render without a single groff warning.
man-check:
	@if ! command -v groff >/dev/null; then \
	  echo "man-check: SKIPPED, groff not found (Debian package groff-base)"; \
	elif [ ! -f $(MAN_PAGE) ]; then \
	  echo "man-check: $(MAN_PAGE) does not exist" >&2; exit 1; \
	else \
	  out=$$(groff -man -ww -z $(MAN_PAGE) 2>&1); \
	  if [ -n "$$out" ]; then echo "$$out" >&2; echo "man-check: $(MAN_PAGE) has groff warnings" >&2; exit 1; fi; \
	  echo "man-check: $(MAN_PAGE) ok"; \
	fi

ci: lint man-check test

bench:
	bash scripts/bench.sh

# The agent's loop on this machine: dev control plane + builder and deploy agents in the
# background, the sample app through build → deploy.  demo-down stops them (test bed stays).
demo:
	bash scripts/demo.sh up

demo-down:
	bash scripts/demo.sh down

# The fault campaign (examples/chaos, issue 18): the dev control plane and two agents on the
# test bed under a random workload and fault schedule drawn from SEED; invariants checked over
# the recorded history. `make chaos SEED=<n>` replays a seed's schedule. chaos-ci: the short
# campaign (fixed seeds plus a random one, about 3 minutes).
SEED ?=
DURATION ?= 3m
chaos:
	@scripts/testbed.sh up >/dev/null
	$(CARGO) build --release --locked --bin muvee-agent --example chaos
	@eval "$$(scripts/testbed.sh env)"; st=0; for s in $${SEED:-random}; do \
	  target/release/examples/chaos --seed "$$s" --duration "$(DURATION)" || st=1; \
	done; exit $$st

chaos-ci:
	bash scripts/chaos-ci.sh

install: static install-data
	install -D -m 0755 $(STATIC_BIN) $(DESTDIR)$(PREFIX)/bin/muvee-agent

# Everything but the binary: man page, systemd unit (ExecStart under PREFIX), env file example
# and the compose recipe.  /etc/muvee/agent.env itself is the operator's: never overwritten.
install-data:
	install -D -m 0644 $(MAN_PAGE) $(DESTDIR)$(PREFIX)/share/man/man1/muvee-agent.1
	install -d $(DESTDIR)$(PREFIX)/lib/systemd/system
	sed 's#^ExecStart=.*#ExecStart=$(PREFIX)/bin/muvee-agent#' packaging/muvee-agent.service \
	  > $(DESTDIR)$(PREFIX)/lib/systemd/system/muvee-agent.service
	chmod 0644 $(DESTDIR)$(PREFIX)/lib/systemd/system/muvee-agent.service
	install -D -m 0644 packaging/agent.env.example $(DESTDIR)$(PREFIX)/share/muvee-agent/agent.env.example
	install -D -m 0644 packaging/docker-compose.agent.yml $(DESTDIR)$(PREFIX)/share/muvee-agent/docker-compose.agent.yml
	install -D -m 0644 packaging/Dockerfile.agent $(DESTDIR)$(PREFIX)/share/muvee-agent/Dockerfile.agent

clean:
	$(CARGO) clean
