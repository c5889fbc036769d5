"""RQ through redcloak: enqueue a job, a burst worker runs it, the caller
reads its result. A second job waits in a queue no worker reads, so the
test can look for its arguments in Redis.

usage: rq_example.py redis://127.0.0.1:PORT/0
"""
import sys

from redis import Redis
from rq import Queue, Worker


def shout(secret):
    return {"shouted": secret.upper(), "given": secret}


if __name__ == "__main__":
    connection = Redis.from_url(sys.argv[1])
    queue = Queue("default", connection=connection)
    job = queue.enqueue("rq_example.shout", "rq-arg-secret")
    Queue("parked", connection=connection).enqueue("rq_example.shout", "rq-parked-secret")
    Worker([queue], connection=connection).work(burst=True)
    job.refresh()
    result = job.return_value()
    if job.get_status() != "finished" or result is None:
        sys.exit(f"job {job.get_status()}: {job.exc_info}")
    print(f"result {result['shouted']} {result['given']}")
