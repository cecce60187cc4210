"""Enqueue an admitted ask: RQ's own job record, written atomically only if the job id is new.

`Queue.enqueue(..., pipeline=pipe)` builds RQ's commands (job hash, TTLs, queue push) into a pipeline
that sends nothing. One Lua call then replays them through the async client, but only when no job with
that id exists: the guarantee of RQ's `unique=True` (a job id enqueued twice would run twice), in one
round trip that does not stop the event loop. RQ's own `unique=True` would send its Lua through the
synchronous client and block the loop for that round trip (bench/RESULTS.md).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rq.callbacks import Callback
from rq.exceptions import DuplicateJobError
from rq.job import Job

from shared.admission import LeaseRef

if TYPE_CHECKING:
    from api.context import AppContext

# KEYS: 1 the job's hash
# ARGV: the recorded commands, each as its word count followed by its words
# Returns 1 when the commands ran, 0 when the job hash already exists (nothing written).
ENQUEUE_NEW_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""


async def enqueue_ask(ctx: AppContext, ref: LeaseRef, message: str) -> None:
    """Put the ask on the queue; DuplicateJobError (nothing written) when the job id is taken."""
    s = ctx.settings
    pipe = ctx.rq_redis.pipeline(transaction=True)
    try:
        ctx.queue.enqueue(
            "worker.jobs.run_ask",
            kwargs={"user": ref.user, "session_id": ref.session_id, "message": message},
            job_id=ref.job_id,
            job_timeout=s.rq_job_timeout_s,
            ttl=s.queue_ttl_s,
            result_ttl=s.result_ttl_s,
            failure_ttl=s.failure_ttl_s,
            meta={"user": ref.user, "session_id": ref.session_id, "admitted_at": time.time()},
            on_failure=Callback("worker.jobs.on_failure"),
            on_stopped=Callback("worker.jobs.on_stopped"),
            description=f"ask by {ref.user}",
            pipeline=pipe,
        )
        words: list[Any] = []
        for args, _options in pipe.command_stack:
            words += [len(args), *args]
    finally:
        pipe.reset()
    if not await ctx.enqueue_new(keys=[Job.key_for(ref.job_id)], args=words):
        raise DuplicateJobError(f"a job with id {ref.job_id} exists already")
