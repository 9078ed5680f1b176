#!/usr/bin/env bash
# `make run`: a Martinet server and one worker in the foreground, started and stopped in order.
#
#   bash packaging/run.sh MARTINET HANDLERS     (make run: .venv/bin/martinet handlers)
#
# The worker starts only once our own server answers a ping (the reply carries its pid, so another
# server already on the port is not taken for it). A server that cannot start (a port taken, an
# unusable database) ends this script at once with its exit code, and no worker is started.
#
# Ctrl-C, SIGTERM or SIGHUP stops the worker first: it takes no new tasks and its running ones
# finish and report within its grace (MARTINET_GRACE, 30 s). Then the server stops. A second
# signal stops the worker at once; its unfinished tasks go back to the server, still up then.
# The server and the worker run in process groups of their own (set -m), so the terminal's
# Ctrl-C reaches this script and make only, and the order is this script's to keep.
#
# Settings are the usual MARTINET_* variables. The worker and the pings go to the address the
# server binds (MARTINET_BIND; 127.0.0.1 for a wildcard), whatever MARTINET_URL says.
# Exit status: 0 when stopped by a signal, else the status of whichever process failed.
set -u

martinet=${1:?usage: run.sh MARTINET HANDLERS}
handlers=${2:?usage: run.sh MARTINET HANDLERS}
host=${MARTINET_BIND:-127.0.0.1}
case $host in 0.0.0.0 | '*') host=127.0.0.1 ;; esac
port=${MARTINET_CLIENT_PORT:-8008}
server='' worker='' signals=0

say() { printf 'make run: %s\n' "$*" >&2; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Sleeps 0.1 s in the wait builtin, which a trapped signal interrupts at once. Not a foreground
# sleep: bash skips its INT trap when the foreground child it waits for exits normally (it takes
# the signal as the child's to handle), and a sleep the signal reached before its exec does.
nap() {
    sleep 0.1 &
    wait $!
}

# Polls until process $1 has exited; its exit status goes in $code.
reap() {
    while alive "$1"; do nap; done
    wait "$1"
    code=$?
}

on_signal() {
    signals=$((signals + 1))
    if alive "$worker"; then
        [ "$signals" -eq 1 ] && say "stopping the worker, then the server (again to stop the worker without waiting)"
        kill -TERM "$worker"
    elif alive "$server"; then
        kill -TERM "$server"
    fi
}
trap on_signal INT TERM HUP

set -m
"$martinet" serve </dev/null &
server=$!
set +m

# Whether our own server answers: a ping on the client port gets a reply from its pid (not from
# another server already there).
answers() {
    "$martinet" ping --url "$host" --client-port "$port" --timeout 2 --json 2>/dev/null | grep -q "\"pid\": $server,\?\$"
}

until [ "$signals" -gt 0 ] || answers; do
    if ! alive "$server"; then
        reap "$server"
        [ "$signals" -gt 0 ] && exit "$code"
        say "the server exited with status $code before it answered; no worker started"
        exit $((code ? code : 1))
    fi
    nap
done

if [ "$signals" -eq 0 ]; then
    set -m
    "$martinet" work --handlers "$handlers" --url "$host" </dev/null &
    worker=$!
    set +m
    http=${MARTINET_HTTP_PORT:-8010}
    [ "$http" = 0 ] || say "dashboard on http://$host:$http/ ; Ctrl-C stops the worker, then the server"
fi
while alive "$worker" && alive "$server"; do nap; done

status=0
if [ -z "$worker" ]; then # stopped by a signal before the worker started
    kill -TERM "$server" 2>/dev/null
    reap "$server"
    status=$code
elif ! alive "$worker"; then # stopped by a signal, or failed: the server stops next
    reap "$worker"
    [ "$code" -eq 0 ] || { say "the worker exited with status $code; stopping the server"; status=$code; }
    kill -TERM "$server" 2>/dev/null
    reap "$server"
    [ "$code" -eq 0 ] || [ "$status" -ne 0 ] || { say "the server exited with status $code"; status=$code; }
else # the server stopped under the worker: no point in waiting for its tasks
    reap "$server"
    say "the server exited with status $code; stopping the worker now"
    status=$code
    kill -TERM "$worker"
    sleep 0.2
    kill -TERM "$worker" 2>/dev/null
    reap "$worker"
fi
exit "$status"
