#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks drive (libnghttp2-dev: the header the
# HTTP/2 codec on libnghttp2 is compiled against; real peers: nginx, HAProxy, wrk,
# iperf3, h2load, curl, openssl; redis-server behind the Redis-backed test rate limit service,
# moorline/testing/rls_server.py; iptables for the transparent-interception tests, which install
# REDIRECT rules in a network namespace of their own: both the nft and the legacy backend work
# there, tests/net/test_original_dst_netns.py takes whichever `iptables` is); nodejs and npm for
# the real SOFARPC (Bolt) peers, sofa-rpc-node, whose npm packages are then installed from
# tests/rpc/node/package-lock.json (moorline/testing/sofa.py drives them), and for the npm grpc-web
# client (tests/filters/grpc_web_node/package-lock.json, tests/filters/test_grpc_web_e2e.py).
# Idempotent: does nothing when all are present.
set -euo pipefail
need=()
for pair in nginx:/usr/sbin/nginx haproxy:/usr/sbin/haproxy wrk:/usr/bin/wrk iperf3:/usr/bin/iperf3 \
            nghttp2-client:/usr/bin/h2load curl:/usr/bin/curl openssl:/usr/bin/openssl \
            libnginx-mod-stream:/usr/lib/nginx/modules/ngx_stream_module.so \
            iptables:/usr/sbin/iptables redis-server:/usr/bin/redis-server \
            nodejs:/usr/bin/node npm:/usr/bin/npm libnghttp2-dev:/usr/include/nghttp2/nghttp2.h; do
  pkg=${pair%%:*}; bin=${pair#*:}
  [ -e "$bin" ] || need+=("$pkg")
done
# The compiled HTTP/1.1 parsers (scripts/build-native.py) need a C compiler and Python's headers.
command -v cc >/dev/null || need+=(gcc libc6-dev)
PY=${PYTHON:-python3}
if command -v "$PY" >/dev/null; then
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  [ -e "$inc/Python.h" ] || need+=(python3-dev)
fi
apt_install() {
  [ ${#need[@]} -eq 0 ] && return 0
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO=sudo; else
      echo "install-deps: missing ${need[*]} and not root; tests that need them will fail" >&2; return 0
    fi
  fi
  echo "install-deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # policy-rc.d keeps the packages' services (nginx on :80, redis on :6379) from starting: tests start their own.
  local created=0
  if [ ! -e /usr/sbin/policy-rc.d ] && [ -z "$SUDO" ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created=1
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ "$created" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}
apt_install

# The npm test peers, exactly as their lock files pin them: the SOFARPC peers (tests/rpc/node) and
# the grpc-web browser client runtime (tests/filters/grpc_web_node); each redone only when its lock
# file is newer than the installed tree (npm writes node_modules/.package-lock.json).
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
for NODE_DIR in "$ROOT/tests/rpc/node" "$ROOT/tests/filters/grpc_web_node"; do
  if command -v npm >/dev/null; then
    if [ ! -e "$NODE_DIR/node_modules/.package-lock.json" ] \
       || [ "$NODE_DIR/package-lock.json" -nt "$NODE_DIR/node_modules/.package-lock.json" ]; then
      echo "install-deps: npm ci in $NODE_DIR" >&2
      (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    fi
  else
    echo "install-deps: npm missing; the tests driving $NODE_DIR will fail" >&2
  fi
done
exit 0
