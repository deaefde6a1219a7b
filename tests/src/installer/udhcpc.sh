#!/bin/sh
# busybox udhcpc's event script: put the lease on the interface.
case "$1" in
    deconfig) ip addr flush dev "$interface" ;;
    bound | renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        for r in $router; do ip route add default via "$r" dev "$interface"; break; done
        ;;
esac
exit 0
