# %post for volume-central ($1: 1 = install, 2 = upgrade): %sysusers_create and
# %systemd_post written out (cargo-generate-rpm has no macros). The unit follows the
# distribution's preset policy on first install; nothing is started here (the service
# needs its database first: `systemctl enable --now volume-central` once configured).
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers volume-central.conf >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload preset volume-central.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
