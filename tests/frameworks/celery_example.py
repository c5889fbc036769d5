"""Celery through redcloak: a worker runs a task and the caller gets its
result (broker and result backend both on redcloak). A second task waits,
unconsumed, in a queue no worker reads, so the test can look for its
arguments in Redis.

usage: celery_example.py redis://127.0.0.1:PORT/0
"""
import os
import subprocess
import sys

from celery import Celery

URL = os.environ.get("EXAMPLE_REDIS_URL") or sys.argv[1]
app = Celery("celery_example", broker=URL, backend=URL)
app.conf.broker_connection_retry_on_startup = True


@app.task
def shout(secret):
    return {"shouted": secret.upper(), "given": secret}


if __name__ == "__main__":
    env = dict(os.environ, EXAMPLE_REDIS_URL=URL)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_example", "worker", "--pool=solo",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=WARNING"],
        cwd=os.path.dirname(os.path.abspath(__file__)), env=env)
    try:
        result = shout.delay("celery-arg-secret").get(timeout=60)
        shout.apply_async(("celery-parked-secret",), queue="parked")
        print(f"result {result['shouted']} {result['given']}")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
