#!/bin/busybox sh
# /init of the level-1 Linux that gracevm boots in qemu-system-aarch64 when the host is not an
# aarch64 KVM host. It runs each job in /stage/jobs (one shell-quoted gracevm argv per line)
# with the aarch64 gracevm under KVM, records each exit status, and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose stage /stage ||
    echo "[gracevm] level-1: cannot mount the stage share"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /out 2>/dev/null
if [ ! -e /dev/kvm ]; then
    echo "[gracevm] level-1: no /dev/kvm (qemu without virtualization=on?)"
fi
n=0
while IFS= read -r job <&3; do
    n=$((n + 1))
    eval "set -- $job"
    /bin/gracevm "$@"
    echo $? > /stage/status.$n
    sync
done 3< /stage/jobs
echo "[gracevm] level-1: $n job(s) done"
sync
poweroff -f
