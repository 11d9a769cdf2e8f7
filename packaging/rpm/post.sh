# %post for volume-agent ($1: 1 = install, 2 = upgrade). cargo-generate-rpm has no
# macros, so this is %tmpfiles_create and %systemd_post written out. As with every
# RPM-packaged service, the unit follows the distribution's preset policy on first
# install (enable it with `systemctl enable --now volume-agent` after editing
# /etc/volume-agent/config.toml); nothing is started here.
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create volume-agent.conf >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload preset volume-agent.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
