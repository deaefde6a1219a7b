# The test installer: what a distribution installer does, in busybox sh. It runs as the
# initramfs' /init, after the kit's preamble has mounted /proc, /sys, /dev and loaded the
# modules. Answers come from `url=` on the kernel command line (over DHCP and HTTP) or from
# an `answers` file on the floppy; they are shell assignments:
#   root_password=...  hostname=...  disk=/dev/vda  ssh=on|off  firmware=bios|uefi|both
# Every line goes to the console (serial and screen) with the seconds since boot, so a test
# can time each step.

say() { echo "kiln-installer [$(cut -d' ' -f1 /proc/uptime)s]: $*"; }
# A real installer stops and shows the error; it never powers off as if it had succeeded.
fail() {
    say "FAILED: $*"
    echo KILN-INSTALL-FAILED
    while true; do sleep 3600; done
}
mkdir -p /cdrom /live /target /floppy /etc/udhcpc /tmp

say "started: $(cat /proc/cmdline)"

url=
for w in $(cat /proc/cmdline); do
    case "$w" in url=*) url="${w#url=}" ;; esac
done

if [ -n "$url" ]; then
    nic=
    for i in $(seq 1 50); do
        for n in /sys/class/net/*; do
            n="${n##*/}"
            [ "$n" = lo ] || { nic="$n"; break; }
        done
        [ -n "$nic" ] && break
        sleep 0.2
    done
    [ -n "$nic" ] || fail "no network interface"
    ip link set lo up
    ip link set "$nic" up
    say "DHCP on $nic"
    udhcpc -i "$nic" -s /etc/udhcpc/script -q -n -t 20 -T 2 || fail "no DHCP lease on $nic"
    say "fetching answers from $url"
    ok=
    for i in 1 2 3 4 5; do
        if wget -q -O /tmp/answers "$url"; then ok=1; break; fi
        sleep 1
    done
    [ -n "$ok" ] || fail "cannot fetch $url"
else
    say "no url= on the command line: answers from the floppy"
    mount -t vfat -o ro /dev/fd0 /floppy || fail "no floppy with answers"
    for f in answers ANSWERS; do
        [ -f "/floppy/$f" ] && cp "/floppy/$f" /tmp/answers && break
    done
    umount /floppy
    [ -f /tmp/answers ] || fail "the floppy has no answers file"
fi

root_password=
hostname=debian
disk=
ssh=on
firmware=both
. /tmp/answers || fail "cannot read the answers"
[ -n "$root_password" ] || fail "the answers set no root_password"
if [ -z "$disk" ]; then
    for d in /dev/vda /dev/sda; do
        [ -b "$d" ] && { disk="$d"; break; }
    done
fi
[ -b "$disk" ] || fail "no disk to install on ($disk)"
say "answers: hostname=$hostname disk=$disk ssh=$ssh firmware=$firmware"

say "mounting the CD and the live root"
for i in $(seq 1 50); do
    [ -b /dev/sr0 ] && break
    sleep 0.2
done
mount -t iso9660 -o ro /dev/sr0 /cdrom || fail "cannot mount the CD"
mount -t ext4 -o ro,loop /cdrom/live/root.img /live || fail "cannot mount live/root.img"

in_root() {
    r="$1"
    shift
    mount -o bind /dev "$r/dev" && mount -t proc proc "$r/proc" && mount -t sysfs sysfs "$r/sys" \
        || fail "cannot prepare $r for chroot"
    chroot "$r" "$@"
    rc=$?
    umount "$r/sys" "$r/proc" "$r/dev"
    return $rc
}

case "$disk" in
    *[0-9]) part="${disk}p" ;;
    *) part="$disk" ;;
esac
say "partitioning $disk: GPT with a BIOS boot partition, an ESP and the root"
printf 'label: gpt\nstart=1MiB, size=1MiB, type=21686148-6449-6E6F-744E-656564454649\nsize=64MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n' \
    | in_root /live sfdisk -q "$disk" || fail "sfdisk $disk"
for i in $(seq 1 50); do
    [ -b "${part}3" ] && break
    sleep 0.2
done
[ -b "${part}3" ] || fail "no ${part}3 after partitioning"
in_root /live mkfs.vfat -F 32 -n EFI "${part}2" >/dev/null || fail "mkfs.vfat ${part}2"
in_root /live mkfs.ext4 -q -F -L root "${part}3" || fail "mkfs.ext4 ${part}3"
root_uuid="$(in_root /live blkid -s UUID -o value "${part}3")"
esp_uuid="$(in_root /live blkid -s UUID -o value "${part}2")"
[ -n "$root_uuid" ] || fail "no UUID on ${part}3"

say "copying the system"
mount -t ext4 "${part}3" /target || fail "cannot mount ${part}3"
cp -a /live/. /target/ || fail "copying the system"
mkdir -p /target/boot/efi
mount -t vfat "${part}2" /target/boot/efi || fail "cannot mount the ESP"
say "copied $(du -sm /target | cut -f1) MiB"

say "configuring"
printf 'UUID=%s / ext4 errors=remount-ro 0 1\nUUID=%s /boot/efi vfat umask=0077,nofail 0 0\n' \
    "$root_uuid" "$esp_uuid" > /target/etc/fstab
echo "$hostname" > /target/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$hostname" > /target/etc/hosts
echo "root:$root_password" | in_root /target chpasswd || fail "chpasswd"
if [ "$ssh" = off ]; then
    in_root /target systemctl mask ssh.service ssh.socket || fail "masking ssh"
    say "ssh masked"
fi

release=
for k in /target/boot/vmlinuz-*; do release="${k##*/vmlinuz-}"; done
[ -n "$release" ] || fail "no kernel in /boot"
say "installing GRUB ($firmware) for kernel $release"
case "$firmware" in
    bios | both)
        in_root /target grub-install --target=i386-pc "$disk" || fail "grub-install i386-pc" ;;
esac
case "$firmware" in
    uefi | both)
        in_root /target grub-install --target=x86_64-efi --efi-directory=/boot/efi \
            --removable --no-nvram || fail "grub-install x86_64-efi" ;;
esac
cat > /target/boot/grub/grub.cfg <<CFG
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=0
search --no-floppy --fs-uuid --set=root $root_uuid
menuentry 'Debian GNU/Linux' {
  linux /boot/vmlinuz-$release root=UUID=$root_uuid ro console=tty0 console=ttyS0,115200 no_timer_check
  initrd /boot/initrd.img-$release
}
CFG

sync
umount /target/boot/efi /target || fail "unmounting the new system"
umount /live /cdrom
say "done"
echo KILN-INSTALL-DONE
poweroff -f
