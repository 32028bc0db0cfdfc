"""``python -m webhooks``: the webhook delivery worker (RQ, no torch). Retries wait in RQ's scheduler."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from rq import SimpleWorker
from rq.serializers import JSONSerializer

from jobstore.contract import WEBHOOK_QUEUE
from jobstore.queues import connect, rq_queue
from jobstore.settings import SettingsError, get_settings

log = logging.getLogger("urae.webhooks")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m webhooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=f"webhooks-{socket.gethostname()}-{os.getpid()}", help="worker name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"urae-webhooks: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not settings.webhook_secret:
        log.warning("URAE_WEBHOOK_SECRET is not set: the API refuses webhooks, so there will be nothing to send")
    conn = connect(settings.redis_url, settings.redis_socket_timeout_s)
    # Jobs run in this process (no fork per delivery): nothing here is heavy or holds a GPU.
    worker = SimpleWorker([rq_queue(conn, WEBHOOK_QUEUE)], connection=conn, serializer=JSONSerializer, name=args.name)
    worker.work(with_scheduler=True, logging_level="WARNING")


if __name__ == "__main__":
    main()
