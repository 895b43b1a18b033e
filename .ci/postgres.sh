#!/usr/bin/env bash
# A PostgreSQL 15 server from Debian's packages on 127.0.0.1:5432 for the sweeper's several-workers test
# (tests/test_sweeper.py::test_two_workers_on_postgresql). Idempotent: it installs the package only when it is
# missing, creates and starts the cluster only when needed, and creates the role and database only once.
#
#   bash .ci/postgres.sh      # as root (or with sudo): sets the server up and prints its URL
#   source .ci/postgres.sh    # .ci/run does this: the same, and exports LRK_TEST_POSTGRES_URL
#
# The server listens on 127.0.0.1 only; role lrk (password lrk) owns database lrk_test.

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # sourced: do the work in a child shell (errexit holds there), export the URL here, never kill the caller
  if _lrk_postgres_url=$(bash "${BASH_SOURCE[0]}" | tail -n 1) && [[ "$_lrk_postgres_url" == postgresql://* ]]; then
    export LRK_TEST_POSTGRES_URL="$_lrk_postgres_url"
    echo "postgres.sh: PostgreSQL ready at $LRK_TEST_POSTGRES_URL" >&2
  else
    echo "postgres.sh: could not set up PostgreSQL; the PostgreSQL test will fail in CI (and skip elsewhere)" >&2
  fi
  unset _lrk_postgres_url
  return 0
fi

set -euo pipefail
# stdout carries the URL alone: everything the tools print (pg_ctlcluster says "Removed stale pid file.") goes
# to stderr, the URL to the saved stdout on fd 3 (closed for the server, which would hold the caller's pipe open)
exec 3>&1 1>&2
version=15 cluster=main port=5432 role=lrk password=lrk database=lrk_test
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

if [ ! -x "/usr/lib/postgresql/$version/bin/postgres" ]; then
  echo "postgres.sh: installing postgresql-$version from Debian's packages" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "postgresql-$version" >/dev/null
fi
cluster_is() {  # cluster_is [status]: the cluster exists (and has that status)
  pg_lsclusters -h | awk -v v="$version" -v c="$cluster" -v s="${1:-}" \
    '$1 == v && $2 == c && (s == "" || $4 == s) {found=1} END {exit !found}'
}
cluster_is || $sudo pg_createcluster "$version" "$cluster" --port "$port" >/dev/null
# 127.0.0.1 only, on the expected port: a drop-in read after postgresql.conf (Debian's include_dir 'conf.d')
conf="/etc/postgresql/$version/$cluster/conf.d/lrk-tests.conf"
wanted=$(printf "listen_addresses = '127.0.0.1'\nport = %s\n" "$port")
if [ "$(cat "$conf" 2>/dev/null)" != "$wanted" ]; then
  printf '%s\n' "$wanted" | $sudo tee "$conf" >/dev/null
  cluster_is online && $sudo pg_ctlcluster "$version" "$cluster" restart 3>&-
fi
cluster_is online || $sudo pg_ctlcluster "$version" "$cluster" start 3>&-
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$port" || { echo "postgres.sh: the server did not answer on 127.0.0.1:$port" >&2; exit 1; }

psql=($sudo runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -tAq)
if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = '$role'")" ]; then
  "${psql[@]}" -c "CREATE ROLE $role LOGIN PASSWORD '$password'"
fi
if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
  "${psql[@]}" -c "CREATE DATABASE $database OWNER $role"
fi
echo "postgresql://$role:$password@127.0.0.1:$port/$database" >&3
