# %preun for volume-central ($1: 0 = erase, 1 = upgrade): %systemd_preun written out.
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload disable volume-central.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl stop volume-central.service >/dev/null 2>&1 || :
    fi
fi
exit 0
