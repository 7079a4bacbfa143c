"""The lab: a QEMU TCG `-cpu max` VM (emulated AMD-V) running Debian's generic kernel with kvm-amd, so real Linux
guests can boot under real KVM on hosts whose own /dev/kvm cannot boot them (kvm_pvm). Development and CI only."""
