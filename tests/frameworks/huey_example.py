"""Huey through redcloak: its bundled Redis storage tests (queue, schedule,
results, expiring results, result notification), then a queued task, a scheduled
task and a stored result left in Redis, so the test can look for them.

usage: huey_example.py 127.0.0.1:PORT
"""
import datetime
import sys
import unittest

import redis

HOST, PORT = sys.argv[1].rsplit(":", 1)
_pool_init = redis.connection.ConnectionPool.__init__


def _through_redcloak(self, *args, **kwargs):
    # Huey's tests connect to the default host and port: send them to redcloak.
    kwargs["host"], kwargs["port"] = HOST, int(PORT)
    _pool_init(self, *args, **kwargs)


redis.connection.ConnectionPool.__init__ = _through_redcloak

from huey import RedisHuey  # noqa: E402  (after the patch)
from huey.tests import test_storage  # noqa: E402  (it probes Redis on import)

if test_storage.REDIS_VERSION == 0:
    sys.exit("huey's tests reached no Redis through redcloak")
# Not TestPriorityRedisStorage: its queue keeps FIFO order within one
# priority by the bytes of the members, which encrypted members do not have
# (docs/frameworks.md).
CASES = ["TestRedisStorage", "TestRedisStorageWaitResult", "TestRedisExpireStorage"]
suite = unittest.TestSuite(
    unittest.defaultTestLoader.loadTestsFromTestCase(getattr(test_storage, case))
    for case in CASES)
result = unittest.TextTestRunner(verbosity=1).run(suite)
skipped_for_redis = [reason for _, reason in result.skipped if "redis" in reason.lower()]
if not result.wasSuccessful() or skipped_for_redis or result.testsRun < 30:
    sys.exit(f"huey storage tests: ran {result.testsRun}, failures {len(result.failures)}, "
             f"errors {len(result.errors)}, skipped for Redis {len(skipped_for_redis)}")

storage = RedisHuey("example", utc=False).storage
storage.flush_all()
due, later = datetime.datetime(2100, 1, 1), datetime.datetime(2100, 1, 2)
storage.enqueue(b"huey-queued-secret")
assert storage.dequeue() == b"huey-queued-secret"
storage.enqueue(b"huey-queued-secret")
storage.add_to_schedule(b"huey-scheduled-secret", due)
assert storage.read_schedule(later) == [b"huey-scheduled-secret"]
storage.add_to_schedule(b"huey-scheduled-secret", due)
storage.put_data(b"task-id", b"huey-result-secret")
assert storage.peek_data(b"task-id") == b"huey-result-secret"
print(f"huey storage tests passed: {result.testsRun}")
