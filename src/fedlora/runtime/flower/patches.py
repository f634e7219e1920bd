"""Patches of Flower 1.42's internals, all in this file: a Flower upgrade touches only this one.

- `fast_object_pulls`: shorter retry backoff when pulling message objects;
- `CappedSleep`: the SuperNode loop's fixed sleeps capped;
- `serve_client_tasks`: a long-lived ClientApp worker instead of a process per message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

log = logging.getLogger("fedlora")
TRACE = os.environ.get("FEDLORA_FLOWER_TRACE") == "1"  # timestamps of every message's phases, on stdout


def fast_object_pulls(initial: float = 0.02, cap: float = 0.25) -> None:
    """Retry pulls of not-yet-available message objects after 20 ms (doubling to 0.25 s), in this process.

    A message becomes visible before its objects are all pushed, and Flower 1.42 retries such a pull after
    1 s, doubling to 10 s (`PULL_INITIAL_BACKOFF`, not configurable): on loopback every exchange lost 1-3 s
    to it, at each hop (ServerApp <- SuperLink <- SuperNode <- ClientApp). No effect where Flower lacks it.
    """
    import functools
    import importlib

    try:
        iu = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
    except ImportError:
        return
    orig = getattr(iu.pull_objects, "__wrapped__", iu.pull_objects)

    @functools.wraps(orig)
    def pull_objects(*args, **kwargs):
        kwargs["initial_backoff"] = min(kwargs.get("initial_backoff", initial), initial)
        kwargs["backoff_cap"] = min(kwargs.get("backoff_cap", cap), cap)
        return orig(*args, **kwargs)

    for name in ("flwr.supercore.inflatable.inflatable_utils", "flwr.superlink.grid.http_grid",
                 "flwr.supernode.start_client_internal"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, "pull_objects", None) in (orig, iu.pull_objects):
            mod.pull_objects = pull_objects



class CappedSleep:
    """`time` for Flower's SuperNode loop with its sleeps capped: it waits 3 s after every empty poll of the
    SuperLink and 0.5 s between checks for a reply, neither configurable in Flower 1.42."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def serve_client_tasks(runtime_address: str, stop: threading.Event, poll: float = 0.05) -> None:
    """Run this process's `client_app` for every ClientApp task of the local SuperNode, until `stop` is set.

    Flower 1.42 starts a fresh `flwr-clientapp` process for every message (both isolation modes); with
    `--isolation process` it leaves the launching to us. This loop takes that role (what Flower's
    SuperExec + `flwr-clientapp` do: acquire the task, pull its message, call the ClientApp, push the
    reply), in a process that keeps torch, the model and the tokenized data loaded between messages.
    """
    from flwr.common.constant import SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from .client import client_app

    def client(*interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(runtime_address, True, None, list(interceptors),
                                                     retry_invoker=make_simple_http_retry_invoker())

    acquirer = client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    while not stop.is_set():
        try:
            res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except Exception as e:  # noqa: BLE001 - the SuperNode's API is not up yet, or restarting
            log.debug("AcquireTask failed: %s", e)
            stop.wait(0.5)
            continue
        if not (res.HasField("task") and res.token):
            stop.wait(poll)
            continue
        task = client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(res.token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(task))
        heartbeat.start()
        context, status, details = None, SubStatus.FAILED, "ClientApp failed"
        marks = [("acquired", time.time())]
        try:
            message, context, _run, _fab = pull_task_input(task)
            marks.append(("pulled", time.time()))
            try:
                reply = client_app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as e:  # noqa: BLE001 - becomes an error reply, as in flwr-clientapp
                log.error("ClientApp raised: %s", traceback.format_exc())
                details = f"{type(e).__name__}: {e}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
            marks.append(("ran", time.time()))
            push_message(task, reply, context)
            marks.append(("pushed", time.time()))
        except Exception:  # noqa: BLE001 - keep serving the next task
            log.error("task failed: %s", traceback.format_exc())
        finally:
            try:
                push_task_output(task, context, status, details)
            finally:
                heartbeat.stop()
                task.close()
                marks.append(("closed", time.time()))
                if TRACE:
                    print("fedlora-trace " + " ".join(f"{k}={v:.3f}" for k, v in marks), flush=True)
