"""Runs a command once its starter says so, or not at all: the first half of ``GroupProcess.spawn``.

``python -I -S held_start.py ARGV...`` blocks on one byte from its stdin. The
server writes it after storing the new process group with the job, so a server
killed between starting a trainer and recording it leaves no trainer behind:
the pipe's write end closes with the server, the read returns end of file, and
ARGV never runs. Only ``os``, ``signal`` and ``sys`` are imported (``-I -S``: no site, no
PYTHONPATH), so the wait costs little more than a bare interpreter
start; ``exec`` keeps the process id, hence the group id and the start time the
server recorded.

``held_start.py --parent-death-signal=SIG:PID ARGV...`` also asks Linux to send
SIG to the command when its starter, PID, dies (``PR_SET_PDEATHSIG``, kept across
``exec``): a server killed with ``kill -9`` then leaves no such child running
until its next start. The kernel sends it when the starter's *thread* that
started the child ends, so start such a child from a thread that lives as long
as the server (its event loop's). Elsewhere than Linux the option does nothing.

``--address-space=BYTES`` sets a hard limit on the command's virtual memory
(``RLIMIT_AS``, kept across ``exec``), and ``--unheld`` runs the command at once,
without waiting for the byte: together, ``procgroup.run_bounded``'s start of a
short check.
"""

import os
import signal
import sys

NOT_RELEASED = 75  # EX_TEMPFAIL: the starter went away before it let the command run
NOT_FOUND = 127  # as a shell says for a command it cannot run
PARENT_DEATH_OPTION = "--parent-death-signal="
ADDRESS_SPACE_OPTION = "--address-space="
UNHELD_OPTION = "--unheld"
CANNOT_RUN = "segsvc: cannot run the command"  # how the line starts when exec fails: the command, ": ", why
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(signum: int, parent: int) -> None:
    """Have ``signum`` sent to this process when ``parent`` dies; sent now when it is gone already."""
    try:
        import ctypes  # only for this option: the plain held start stays a bare interpreter

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no prctl (not Linux)
        return
    if os.getppid() != parent:  # it died before the request: the kernel will never send it
        os.kill(os.getpid(), signum)


def limit_address_space(limit: int) -> None:
    """A hard limit of ``limit`` bytes on this process's virtual memory, and so on the command's."""
    import resource  # only for this option, like ctypes above

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str]) -> int:
    held = True
    while argv and argv[0].startswith("--"):
        option = argv.pop(0)
        if option.startswith(PARENT_DEATH_OPTION):
            signum, _, parent = option[len(PARENT_DEATH_OPTION):].partition(":")
            die_with_parent(int(signum), int(parent))
        elif option.startswith(ADDRESS_SPACE_OPTION):
            limit_address_space(int(option[len(ADDRESS_SPACE_OPTION):]))
        elif option == UNHELD_OPTION:
            held = False
        else:
            sys.stderr.write(f"held_start: unknown option {option}\n")
            return 2
    if not argv:
        sys.stderr.write("held_start: no command given\n")
        return 2
    if held and not os.read(0, 1):
        sys.stderr.write("segsvc: the command did not run: the server stopped it, or stopped itself, before "
                         "recording it\n")
        return NOT_RELEASED
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for name in ("SIGPIPE", "SIGXFSZ"):  # Python ignores these; exec would keep them ignored (Popen resets them)
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"{CANNOT_RUN} {argv[0]}: {exc.strerror}\n")
    return NOT_FOUND


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
