# %postun for volume-central ($1: 0 = erase, 1 = upgrade): %systemd_postun_with_restart
# written out. A changed volume-central.toml is kept as .rpmsave on erase; the system
# user and the database stay.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart volume-central.service >/dev/null 2>&1 || :
    fi
fi
exit 0
