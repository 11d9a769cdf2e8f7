# %preun for volume-agent ($1: 0 = erase, 1 = upgrade): %systemd_preun written out.
# On erase, disable the unit and stop the daemon (it finishes in-flight destroys first).
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload disable volume-agent.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl stop volume-agent.service >/dev/null 2>&1 || :
    fi
fi
exit 0
