#!/bin/bash
# build-systemd-root.sh ROOTDIR: build the Debian 12 root of the systemd tier
# (tests/test_systemd_system.py), which boots it with systemd-nspawn and installs vac into it.
#
# The root holds systemd, libvirtd (whose test driver stands in for QEMU), the Python
# libraries vac's RPM requires (by their Debian names), rpm (to install vac's RPMs with their
# scriptlets) and puppet (to apply vac's Puppet module). vac itself is not in it: every test run
# installs the vac under test into an overlay, so this root stays a clean cache.
#
# The result is cached: nothing is rebuilt while ROOTDIR was made by this very script. Needs
# root, debootstrap and systemd-nspawn, and network access to the Debian archive: the mirror
# is $VAC_TEST_DEBIAN_MIRROR, else the first Debian mirror in this host's apt sources.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 ROOTDIR" >&2
    exit 2
fi
root=$1
script_id=$(sha256sum "$0" | cut -d' ' -f1)
if [[ $(cat "$root/.vac-build-id" 2>/dev/null) == "$script_id" ]]; then
    echo "build-systemd-root: $root is up to date"
    exit 0
fi

# debootstrap resolves only plain dependencies, not alternatives or virtual packages: it
# installs the base system, and apt inside the new root adds the rest.
base_packages=systemd,systemd-sysv,dbus
packages=(
    iproute2 procps
    python3 python3-libvirt python3-aiohttp python3-requests python3-openssl python3-daemon
    python3-cryptography python3-prometheus-client
    libvirt-daemon-system libvirt-clients
    rpm puppet
)

mirror=${VAC_TEST_DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
    # One-line (deb URI SUITE ...) and deb822 (URIs: URI) sources; not the security archive.
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -oE 'https?://[^ ]*/debian/?( |$)' | grep -v security | head -n 1 | tr -d ' ' || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

partial=$root.partial
rm -rf "$partial"
mkdir -p "$(dirname "$root")"
debootstrap --variant=minbase --include="$base_packages" bookworm "$partial" "$mirror"
# systemd-nspawn without --boot runs apt with /proc, /dev and the host's resolv.conf in place.
# --keep-unit --register=no: there is no systemd on the host to register with.
systemd-nspawn --quiet --register=no --keep-unit -D "$partial" \
    --setenv=DEBIAN_FRONTEND=noninteractive /bin/sh -ec "
        apt-get update -q
        apt-get install -y -q --no-install-recommends ${packages[*]}
        apt-get clean
        rm -rf /var/lib/apt/lists/*"

# Nothing in the container may reach out of it or slow its boots and shutdowns: libvirt's
# default NAT network (it would need dnsmasq and iptables), libvirt-guests (suspends guests at
# shutdown), and the periodic maintenance timers.
rm -f "$partial"/etc/libvirt/qemu/networks/autostart/default.xml
for unit in libvirt-guests.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
            e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$partial/etc/systemd/system/$unit"
done
# The console getty would wait for input that never comes.
ln -sf /dev/null "$partial/etc/systemd/system/console-getty.service"

echo "$script_id" > "$partial/.vac-build-id"
rm -rf "$root"
mv "$partial" "$root"
echo "build-systemd-root: built $root"
