#!/usr/bin/env bash
# Make a Debian/Ubuntu machine ready to build, run and test mtad. Idempotent: it installs only what is
# missing (checked by the binary each package provides) and prints one line per thing it installed,
# nothing when everything is present.
#
# System daemons are never left running: mtad starts its own PostgreSQL cluster, and the test suite
# its own SMTP sinks. postgresql, postfix and prometheus are installed for their binaries only
# (initdb/pg_ctl, smtp-sink/smtp-source, promtool). While installing, a temporary policy-rc.d keeps
# maintainer scripts from starting services; afterwards the services installed here are disabled.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    SUDO=()
fi

have() { command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 || -x /sbin/$1 ]]; }
have_initdb() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
have_venv() { python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' >/dev/null 2>&1; }

# package -> reason line printed when it gets installed
declare -a missing=()
declare -A why=()
want() { missing+=("$1"); why[$1]=$2; }

have_initdb || want postgresql "installed postgresql (server binaries for mtad's own cluster)"
have_venv || want python3-venv "installed python3-venv"
have swaks || want swaks "installed swaks"
# swaks --tls needs Net::SSLeay, which Debian's swaks only recommends.
perl -MNet::SSLeay -e1 >/dev/null 2>&1 || want libnet-ssleay-perl "installed libnet-ssleay-perl (swaks --tls)"
have openssl || want openssl "installed openssl"
{ have smtp-sink && have smtp-source; } || want postfix "installed postfix (for smtp-sink/smtp-source; daemon left stopped)"
have promtool || want prometheus "installed prometheus (for promtool; service left stopped)"
have runuser || want util-linux "installed util-linux (runuser)"
# systemd-analyze checks systemd/mtad.service offline (tests/component/test_systemd_unit.py).
have systemd-analyze || want systemd "installed systemd (for systemd-analyze; not started)"

((${#missing[@]} == 0)) && exit 0

if [[ $(id -u) -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
    echo "install-system-deps: need root or sudo to install: ${missing[*]}" >&2
    exit 1
fi

as_root() { "${SUDO[@]}" "$@"; }

apt_log=$(mktemp -t mtad-apt.XXXXXX)
policy=/usr/sbin/policy-rc.d
made_policy=0
cleanup() {
    if ((made_policy)); then as_root rm -f "$policy"; fi
    rm -f "$apt_log"
}
trap cleanup EXIT

fail() {
    echo "install-system-deps: $1 failed; last lines of apt output:" >&2
    tail -n 20 "$apt_log" >&2
    exit 1
}

# Keep maintainer scripts from starting daemons (exit 101 = action forbidden).
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    made_policy=1
fi

if [[ " ${missing[*]} " == *" postfix "* ]]; then
    printf '%s\n' 'postfix postfix/main_mailer_type select No configuration' \
        'postfix postfix/mailname string localhost' | as_root debconf-set-selections
fi

as_root apt-get update -qq >"$apt_log" 2>&1 || fail "apt-get update"
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}" >>"$apt_log" 2>&1 || fail "apt-get install ${missing[*]}"

# Services a package may have started or enabled anyway (no policy-rc.d honoured, systemd hosts).
stop_service() {
    local name=$1
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        as_root systemctl disable --now "$name" >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1; then
        as_root service "$name" stop >/dev/null 2>&1 || true
    fi
}

for pkg in "${missing[@]}"; do
    case $pkg in
        postgresql)
            stop_service postgresql
            # Debian creates a default cluster; mtad runs its own, so make sure that one stays down.
            if command -v pg_lsclusters >/dev/null 2>&1; then
                while read -r ver name _; do
                    as_root pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
                    conf=/etc/postgresql/$ver/$name/start.conf
                    [[ -f $conf ]] && echo manual | as_root tee "$conf" >/dev/null
                done < <(pg_lsclusters -h 2>/dev/null)
            fi
            ;;
        postfix)
            stop_service postfix
            as_root postfix stop >/dev/null 2>&1 || true
            ;;
        prometheus)
            stop_service prometheus
            if [[ -r /run/prometheus.pid ]]; then
                as_root kill "$(cat /run/prometheus.pid)" >/dev/null 2>&1 || true
            fi
            ;;
    esac
    echo "${why[$pkg]}"
done
