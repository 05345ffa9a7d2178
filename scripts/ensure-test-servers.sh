#!/usr/bin/env bash
# Make the server binaries the test suite starts available on this machine.
#   PostgreSQL: the distribution's package (as root, through apt-get), else the PyPI wheel
#   `pgserver` in the project's virtual environment (as an ordinary user).
# Nothing is started here: the tests start and stop their own servers.
set -euo pipefail
venv_pip="${1:-.venv/bin/pip}"

have_postgres() {
  command -v initdb >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && return 0
  "${venv_pip%/pip}/python" -c "import pgserver" >/dev/null 2>&1 && return 0
  return 1
}

if [ -n "${TEST_DATABASE_URL:-}" ]; then
  echo "TEST_DATABASE_URL is set: the tests use that PostgreSQL server"
elif have_postgres; then
  echo "PostgreSQL server binaries: present"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing PostgreSQL (Debian package postgresql)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
else
  echo "installing PostgreSQL binaries from PyPI (pgserver) into the virtual environment"
  "$venv_pip" install -q "pgserver==0.1.4"
fi

# Chromium for the console's browser tests (Playwright drives Debian's package; its own
# browser download is not used). Without it, and not root, those tests skip and say why.
if [ -x /usr/bin/chromium ] || [ -n "${TEST_CHROMIUM:-}" ]; then
  echo "Chromium: present"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Chromium (Debian package chromium)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  echo "Chromium missing and not root: the console's browser tests will be skipped"
fi

# PgBouncer, for the API suite's run through transaction pooling (tests/conftest.py).
# Without it, and not root, those tests skip and say why.
if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
  echo "PgBouncer: present"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing PgBouncer (Debian package pgbouncer)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null
else
  echo "PgBouncer missing and not root: the tests through PgBouncer will be skipped"
fi
