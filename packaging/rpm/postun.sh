# %postun for volume-agent ($1: 0 = erase, 1 = upgrade): %systemd_postun_with_restart
# written out. On upgrade the running daemon is restarted on the new binary; on erase the
# configuration left behind (rpm keeps a changed config.toml as .rpmsave) and the
# state in /var/lib/volume-agent stay, as RPM has no purge.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart volume-agent.service >/dev/null 2>&1 || :
    fi
fi
exit 0
