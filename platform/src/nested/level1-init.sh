#!/bin/busybox sh
# /init of the level-1 Linux that gracevm boots in qemu-system-aarch64 when the host is not an
# aarch64 KVM host. It runs the jobs in /stage/jobs (one shell-quoted gracevm argv per line)
# with the aarch64 gracevm under KVM, several at once, records each exit status, and powers
# off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose stage /stage ||
    echo "[gracevm] level-1: cannot mount the stage share"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /out 2>/dev/null
# What the jobs boot, copied into memory once: every job reads it, and a read over 9p waits on
# qemu's I/O thread, which competes with the vCPUs for the host's cores.
cp -r /stage/inputs /inputs || echo "[gracevm] level-1: cannot copy the inputs from the stage share"
if [ ! -e /dev/kvm ]; then
    echo "[gracevm] level-1: no /dev/kvm (qemu without virtualization=on?)"
fi
# Up to /stage/parallel jobs at once: a scenario that waits (a GPU readiness poll, a boot)
# waits beside the others. Each job writes /stage/status.N when it ends; results and console
# logs are per scenario under /out, so the order they finish in does not matter.
parallel=$(cat /stage/parallel 2>/dev/null || echo 1)
# The host times level 1's boot by this line.
echo "[gracevm] level-1: up, $parallel job(s) at a time"
# A token per free slot in a pipe: a job takes one to start and gives it back when it ends, so
# this loop sleeps in `read` rather than polling /stage (a poll forks, under TCG, beside the
# guests it would slow).
mkfifo /tmp/slots
exec 4<>/tmp/slots
i=0
while [ $i -lt "$parallel" ]; do
    echo >&4
    i=$((i + 1))
done
n=0
while IFS= read -r job <&3; do
    read -r _ <&4
    n=$((n + 1))
    (
        eval "set -- $job"
        /bin/gracevm "$@" 4>&-
        echo $? > /stage/.status.$n
        mv /stage/.status.$n /stage/status.$n
        sync
        echo >&4
    ) 3<&- &
done 3< /stage/jobs
wait
echo "[gracevm] level-1: $n job(s) done"
sync
poweroff -f
