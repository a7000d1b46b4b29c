"""`mount.fusestore`: the helper mount(8) runs for filesystems of type `fusestore`, so that a line
in /etc/fstab, `mount -t fusestore BACKING MNT -o ...` and `mount MNT` mount a tree.

mount(8) calls it as `mount.fusestore BACKING MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS]`, having
kept to itself the options that are its own business (`noauto`, `x-*`, `comment=`). What is
left is sorted here: fusestore's own options and `config=FILE` go to the daemon; the kernel's
mount flags (`nosuid`, `noexec`, `noatime`, ...) go to the kernel through libfuse; the options
that only mean something to mount(8), systemd or other tools (`defaults`, `auto`, `nofail`,
`_netdev`, `user`, `x-systemd.*`) are dropped. An unknown option fails the mount, as mount(8)
would have it, unless `-s` (sloppy) asks to ignore it. The helper returns once the mount
answers, with the daemon running in its own session; `umount MOUNTPOINT` ends the daemon.
"""

from __future__ import annotations

import os
import sys

from fusestore import daemon

# Meaningful to mount(8), systemd, or other tools; nothing to do here.
IGNORED = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "group", "rw",
           "async", "relatime", "norelatime", "nostrictatime", "nolazytime", "nousers", "nogroup", "noowner"}
IGNORED_PREFIXES = ("x-", "comment=", "user=", "helper=")
USAGE = "usage: mount.fusestore BACKING MOUNTPOINT [-sfnv] [-o OPTIONS]"


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> tuple[str, str, list[str], str | None, bool]:
    """(backing, mountpoint, daemon options, config file, fake) from the helper's arguments."""
    positional, options, sloppy, fake = [], [], False, False
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options.extend(next(args, "").split(","))
        elif arg.startswith("-o"):
            options.extend(arg[2:].split(","))
        elif arg in ("-t", "-N"):
            value = next(args, "")
            if arg == "-N":
                raise UsageError(f"-N {value}: mount namespaces are not supported; run mount inside the namespace")
        elif arg.startswith("-") and len(arg) > 1:
            for flag in arg[1:]:
                if flag == "s":
                    sloppy = True
                elif flag == "f":
                    fake = True
                elif flag not in "nv":
                    raise UsageError(f"unknown flag -{flag}\n{USAGE}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError(USAGE)
    kept, config = [], None
    for option in filter(None, options):
        name, _, value = option.partition("=")
        if option in IGNORED or option.startswith(IGNORED_PREFIXES):
            continue
        if name == "config":
            config = value
        elif name in daemon.KNOWN_OPTIONS or name in daemon.KERNEL_FLAGS:
            kept.append(option)
        elif not sloppy:
            raise UsageError(f"unknown mount option {name!r}")
    return positional[0], positional[1], kept, config, fake


def main(argv: list[str] | None = None) -> int:
    from fusestore import cli

    try:
        backing, mountpoint, options, config, fake = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"mount.fusestore: {e}", file=sys.stderr)
        return 1  # mount(8): "incorrect invocation or permissions"
    if fake:
        return 0
    args = ["mount", backing, mountpoint]
    if config:
        args += ["--config", os.path.join(backing, config) if not os.path.isabs(config) else config]
    if options:
        args += ["-o", ",".join(options)]
    code = cli.main(args)
    return 32 if code else 0  # mount(8): "mount failure"


if __name__ == "__main__":
    sys.exit(main())
