#!/bin/bash
# build-guest.sh OUTDIR: build the tiny test guest of the system tier (TESTBED.md §4).
#
# Outputs in OUTDIR:
#   vmlinuz    Debian cloud kernel (LZ4, boots in ~3 s under TCG)
#   initrd.gz  busybox-static initramfs with the virtio modules and the guest's /init
#   guest.iso  bootable ISO (isolinux) holding both, to attach like a CernVM CD-ROM
#   cmdline    kernel command line for direct kernel boot (the ISO uses the same)
#
# The guest's /init brings up eth0 by DHCP, fetches http://169.254.169.254/latest/user-data,
# runs it as a shell script if it starts with "#!", then powers off. User-data scripts can call
# /bin/vac-put NAME VALUE to upload a job output to http://169.254.169.253/joboutputs/NAME.
# All guest output goes to the serial console (ttyS0).
#
# The result is cached: nothing is rebuilt while OUTDIR holds the outputs of this very script.
# Needs root-free tools only, but apt-get download needs network access to the Debian archive.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out_dir=$1
script_id=$(sha256sum "$0" | cut -d' ' -f1)
outputs=(vmlinuz initrd.gz guest.iso cmdline)

cached=yes
for output in "${outputs[@]}"; do
    [[ -s $out_dir/$output ]] || cached=no
done
if [[ $cached == yes && $(cat "$out_dir/build-id" 2>/dev/null) == "$script_id" ]]; then
    echo "build-guest: $out_dir is up to date"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmdline="console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable no_timer_check"
# Load order follows the modules' depends= (TESTBED.md §4); virtio_blk shows the root disk.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk"

# The kernel: resolve the exact package name first. Never hand apt-get a glob: it expands it
# against the whole archive and downloads every matching kernel (pitfall P7).
kernel_package=$(apt-cache depends linux-image-cloud-amd64 |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $kernel_package ]]; then
    echo "build-guest: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2
    exit 1
fi
(cd "$work" && apt-get -q -o APT::Sandbox::User=root download "$kernel_package")
debs=("$work"/*.deb)
dpkg-deb -x "${debs[0]}" "$work/kernel"
kernel_image=("$work"/kernel/boot/vmlinuz-*)
module_dir=("$work"/kernel/lib/modules/*)

root=$work/initramfs
mkdir -p "$root"/{bin,proc,sys,dev,etc,tmp,lib/modules}
cp /bin/busybox "$root/bin/busybox"   # busybox-static: no shared libraries needed
for module in $modules; do
    file=$(find "${module_dir[0]}" -name "$module.ko" | head -n 1)
    if [[ -z $file ]]; then
        echo "build-guest: module $module not found in $kernel_package" >&2
        exit 1
    fi
    cp "$file" "$root/lib/modules/"
done

cat >"$root/udhcpc.sh" <<'SCRIPT'
#!/bin/busybox sh
case "$1" in
bound | renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-16}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
SCRIPT

cat >"$root/bin/vac-put" <<'SCRIPT'
#!/bin/busybox sh
# vac-put NAME VALUE: upload VALUE to the factory's MJF joboutputs/NAME. busybox wget cannot
# PUT, so this POSTs (vacd accepts both); a hand-made PUT through busybox nc does not work
# reliably, because nc half-closes the connection after sending and HTTP servers then drop it.
# Exit 0 on a 2xx answer. Never 'wget -T' (it segfaults in busybox 1.35): timeout instead.
if [ $# -ne 2 ]; then
    echo "usage: vac-put NAME VALUE" >&2
    exit 2
fi
for attempt in 1 2 3; do
    if timeout 5 wget -q -O /dev/null --post-data "$2" "http://169.254.169.253/joboutputs/$1"; then
        exit 0
    fi
    echo "vac-put: $1 attempt $attempt failed" >&2
    sleep 1
done
exit 1
SCRIPT

cat >"$root/init" <<'SCRIPT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
uptime() { cut -d' ' -f1 /proc/uptime; }
echo "GUEST: init uptime=$(uptime)"
for module in MODULES; do
    insmod "/lib/modules/$module.ko"
done
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do
    sleep 0.1
    i=$((i + 1))
done
ip link set eth0 up
udhcpc -i eth0 -s /udhcpc.sh -n -q -f -t 10 -T 1 -A 1 || echo "GUEST: dhcp failed"
echo "GUEST: address $(ip -4 -o addr show dev eth0 | awk '{print $4}') uptime=$(uptime)"
ok=0
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    # Never busybox 'wget -T': it segfaults (pitfall P4). Bound it with timeout instead.
    if timeout 3 wget -q -O /tmp/user-data http://169.254.169.254/latest/user-data; then
        ok=1
        break
    fi
    sleep 0.5
done
echo "GUEST: user-data ok=$ok uptime=$(uptime)"
if [ $ok = 1 ] && [ "$(head -c 2 /tmp/user-data)" = "#!" ]; then
    chmod +x /tmp/user-data
    /tmp/user-data
    echo "GUEST: user-data exit=$?"
fi
echo "GUEST: poweroff uptime=$(uptime)"
sync
poweroff -f
SCRIPT
sed -i "s/MODULES/$modules/" "$root/init"
chmod +x "$root/init" "$root/udhcpc.sh" "$root/bin/vac-put"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -9) >"$work/initrd.gz"

iso=$work/iso
mkdir -p "$iso/isolinux" "$iso/boot"
cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$iso/isolinux/"
cp "${kernel_image[0]}" "$iso/boot/vmlinuz"
cp "$work/initrd.gz" "$iso/boot/initrd.gz"
cat >"$iso/isolinux/isolinux.cfg" <<CONFIG
SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL /boot/vmlinuz
  APPEND initrd=/boot/initrd.gz $cmdline
CONFIG
if ! xorriso -as mkisofs -quiet -o "$work/guest.iso" -V VACGUEST \
    -b isolinux/isolinux.bin -c isolinux/boot.cat -no-emul-boot -boot-load-size 4 \
    -boot-info-table -isohybrid-mbr /usr/lib/ISOLINUX/isohdpfx.bin "$iso" 2>"$work/xorriso.log"; then
    cat "$work/xorriso.log" >&2
    exit 1
fi

mkdir -p "$out_dir"
cp "${kernel_image[0]}" "$out_dir/vmlinuz"
cp "$work/initrd.gz" "$work/guest.iso" "$out_dir/"
echo "$cmdline" >"$out_dir/cmdline"
echo "$script_id" >"$out_dir/build-id"
echo "build-guest: built $out_dir from $kernel_package"
