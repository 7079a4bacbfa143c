#!/bin/sh
# pclite guest /init (busybox sh). Modes come from the kernel command line: pclite.mode=probe|agent|shell.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Tell the VMM "init reached": one byte to the boot-timer MMIO register (Firecracker-compatible address and value).
devmem 0xc0000000 8 123 2>/dev/null
hostname -F /etc/hostname 2>/dev/null

mode=agent
for arg in $(cat /proc/cmdline); do
  case "$arg" in pclite.mode=*) mode="${arg#pclite.mode=}" ;; esac
done

# A microVM has no ACPI: reset (i8042, then triple fault) is its power switch, and the VMM stops on it.
power_off() { sync; reboot -f; }

case "$mode" in
  probe)
    cpus=$(nproc)
    mem_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    echo "pclite-init: ready cpus=$cpus mem_kib=$mem_kib" > /dev/console
    power_off ;;
  agent)
    mkdir -p /tmp /run && mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /run
    ip link set lo up 2>/dev/null
    if [ -x /sbin/pclite-agent ]; then
      /sbin/pclite-agent
      echo "pclite-init: agent exited with status $?" > /dev/console
    else
      echo "pclite-init: no agent in this initramfs" > /dev/console
    fi
    power_off ;;
  shell)
    setsid cttyhack sh
    power_off ;;
  *)
    echo "pclite-init: unknown pclite.mode=$mode (expected probe, agent or shell)" > /dev/console
    power_off ;;
esac
