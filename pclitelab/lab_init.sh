#!/bin/sh
# pclite lab VM (L1) /init: load kvm-amd + 9p, mount the host tree read-only, run the command chrooted in it.
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "pclite-lab: lab init failed: $*" > /dev/console; poweroff -f; }
for module in $(cat /etc/lab-modules); do
  args=""
  # Shadow paging: with nested paging, TCG's emulated NPT under MTTCG corrupts guests that boot at the same
  # time on different lab CPUs (triple faults, stuck boots, once a lab-kernel stack overflow).
  case "$module" in *kvm-amd*) args="npt=0" ;; esac
  insmod "/lib/modules/$module" $args 2>/dev/console || fail "insmod $module"
done
[ -e /dev/kvm ] || fail "kvm-amd loaded but /dev/kvm is missing (is QEMU running with -cpu max?)"
p9="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /results /host
mount -t 9p -o "$p9,cache=none" results /results || fail "mount the results share"
. /results/lab.env
mount -t 9p -o "$p9,cache=loose,ro" hostroot /host || fail "mount the host root"
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mount -t tmpfs -o mode=755 tmpfs /host/run
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup  # as on a systemd host: pclited's VMM jails make cgroup leaves
mount -o bind /dev /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
for share in $LAB_SHARES; do
  tag="${share%%=*}"; path="${share#*=}"
  mkdir -p "/host$path" 2>/dev/null
  mount -t 9p -o "$p9,cache=mmap" "$tag" "/host$path" || fail "mount share $tag at $path"
done
mkdir -p "/host$LAB_RESULTS" && mount -o bind /results "/host$LAB_RESULTS" || fail "bind the results share"
ip link set lo up
if [ "$LAB_NET" = 1 ]; then
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
fi
chroot /host /bin/sh "$LAB_RESULTS/cmd.sh" < /dev/null > /dev/console 2>&1
echo $? > /results/exit-code
sync
poweroff -f
