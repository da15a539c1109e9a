# pilus — see README.md. Every target works on a fresh Debian 12 machine as root.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PILUS   := $(VENV)/bin/pilus
# the packages of every program in src/pilus/programs.tsv (tests/unit/test_programs.py keeps both equal)
APT_PKGS := bpftool clang curl gcc iperf3 iproute2 ipset iptables iputils-ping libbpf-dev libbpf1 llvm make \
            mount nftables procps python3 python3-pip python3-venv util-linux coreutils dash debianutils \
            etcd-server prometheus chromium wrk haproxy dnsmasq-base

.PHONY: setup demo test test-unit test-bpf test-e2e bench lint clean

setup:
	@# idempotent and quick when everything is present
	@missing=""; for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing$$missing"; \
	  noservice=""; [ -e /usr/sbin/policy-rc.d ] || { noservice=1; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; rc=$$?; \
	  [ -z "$$noservice" ] || rm -f /usr/sbin/policy-rc.d; [ $$rc -eq 0 ] || exit $$rc; \
	fi
	@$(MAKE) --no-print-directory $(VENV)/.installed
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || true

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) -m pilus.demo

test: setup
	$(PY) -m pytest tests/unit tests/bpf tests/e2e

test-unit: setup
	$(PY) -m pytest tests/unit

test-bpf: setup
	$(PY) -m pytest tests/bpf

test-e2e: setup
	$(PY) -m pytest tests/e2e

bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.crossnode
	$(PY) -m bench.service_scale
	$(PY) -m bench.policy_resolve
	$(PY) -m bench.hubble
	$(PY) -m bench.l7
	$(PY) -m bench.dns
	$(PY) -m bench.kafka

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf build .pytest_cache
