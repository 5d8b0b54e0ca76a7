"""Start a command as systemd starts a socket-activated service, and restart
it as `systemctl restart` does, with the listening socket held here the
whole time.

    socket_activate.py tcp 127.0.0.1:0 LOGDIR -- gatehouse proxy ...
    socket_activate.py unix /path/.s.PGSQL.6432 LOGDIR -- gatehouse db ...

The socket is passed as fd 3 with LISTEN_FDS=1 and LISTEN_PID set to the
child's pid. Prints `listening ADDR`, then `started PID` for each
generation; generation N logs to LOGDIR/N.log. Commands on stdin, one per
line: `restart` (SIGTERM, wait for the exit, start anew: what systemd does)
and `stop`.
"""
import os
import signal
import socket
import subprocess
import sys


def main():
    kind, where, logdir = sys.argv[1:4]
    command = sys.argv[sys.argv.index("--") + 1 :]
    if kind == "tcp":
        host, port = where.rsplit(":", 1)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, int(port)))
        address = "%s:%d" % listener.getsockname()
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(where)
        os.chmod(where, 0o666)
        address = where
    listener.listen(1024)
    fd = listener.fileno()
    print("listening", address, flush=True)

    generation = 0

    def start():
        nonlocal generation
        generation += 1
        log = open(os.path.join(logdir, "%d.log" % generation), "wb")

        def as_activated():
            if fd == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(fd, 3)  # the copy at 3 is inherited across exec
            os.environ["LISTEN_FDS"] = "1"
            os.environ["LISTEN_PID"] = str(os.getpid())

        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            close_fds=False,
            preexec_fn=as_activated,
        )
        print("started", child.pid, flush=True)
        return child

    child = start()
    for line in sys.stdin:
        child.send_signal(signal.SIGTERM)
        status = child.wait()
        print("exited", status, flush=True)
        if line.strip() == "stop":
            break
        child = start()
    else:
        child.kill()
        child.wait()


if __name__ == "__main__":
    main()
