#!/usr/bin/env bash
# Installs Debian's PostgreSQL server binaries for the tests (as root), without the package's
# own cluster or running service: the tests start a server of their own (tests/pg.py).
set -euo pipefail
policy=/usr/sbin/policy-rc.d
had_policy=0
[ -e "$policy" ] && had_policy=1
if [ "$had_policy" = 0 ]; then  # no service starts during the install
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# postgresql-common first: its createcluster.conf then says not to make the main cluster.
apt-get install -y -qq --no-install-recommends postgresql-common
sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
grep -q '^create_main_cluster = false' /etc/postgresql-common/createcluster.conf ||
  echo "create_main_cluster = false" >>/etc/postgresql-common/createcluster.conf
apt-get install -y -qq --no-install-recommends postgresql
[ "$had_policy" = 1 ] || rm -f "$policy"
