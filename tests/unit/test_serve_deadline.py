"""The ingress's request deadline (serve/app.py), without Ray running: past
`limits.request_timeout_s` a request is a 504 in OpenAI's error shape, and the work it was
waiting for is cancelled (which is what drops its row in the LLM stage)."""

import asyncio
import time

from raybench.serve.app import _within
from raybench.serve.schemas import APIError


def test_a_request_out_of_time_is_a_504_and_its_work_is_cancelled():
    cancelled = asyncio.Event()

    async def work():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main():
        try:
            await _within(time.perf_counter() + 0.05, work())
        except APIError as err:
            return err, cancelled.is_set()
    err, was_cancelled = asyncio.run(main())
    assert err.status == 504 and err.body()["error"]["code"] == "timeout" and was_cancelled


def test_an_answer_in_time_passes_through():
    async def main():
        return await _within(time.perf_counter() + 5, asyncio.sleep(0, result="answer"))
    assert asyncio.run(main()) == "answer"
