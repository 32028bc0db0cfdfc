#!/bin/sh
# The official Redis image's entrypoint, with Debian's setpriv in place of Alpine's su-exec.
set -e
# First argument an option (-f, --some-option) or a .conf file: it is for redis-server.
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi
# Started as root with redis-server: give the data to the redis user and drop to it.
if [ "$1" = 'redis-server' ] && [ "$(id -u)" = '0' ]; then
	find . \! -user redis -exec chown redis '{}' +
	exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
um="$(umask)"
if [ "$um" = '0022' ]; then
	umask 0077
fi
exec "$@"
