"""A warm node. Flower 1.41's SuperNode runs every message in a new `flwr-clientapp` process (importing torch and
Flower, installing the app bundle, building the model and optimizer: seconds per message) and polls the
SuperLink every 3 s when idle. `photon node --warm` instead runs the SuperNode with `--isolation process` (Flower's
mode for an executor started independently) from `python -m photon.launch.warm_node supernode`, which
  - shortens the SuperNode's idle polling of the SuperLink (and its 0.5 s waits for a reply) to IDLE_POLL_S,
    its retries for message parts not yet uploaded (1, 2, 4 s ...) to 20..200 ms, and its heartbeat interval to
    HEARTBEAT_S; these patch Flower 1.41's module globals (pyproject pins flwr 1.41),
  - starts one long-lived ClientApp runtime beside it and restarts it if it dies.
The runtime takes the node's tasks from the SuperNode's Runtime API one at a time and runs each exactly as
`flwr-clientapp` would (same Runtime API calls, heartbeats, error replies), but in one Python process: the app
bundle's ClientApp is loaded once per bundle, so photon's worker (`client_app._workers`: model, memmapped
data, per-client optimizer state) stays warm across messages and rounds. Both children share the SuperNode's
process group: stopping (or killing) the node stops them.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2  # SuperNode idle poll of the SuperLink, and the runtime's poll of the SuperNode (Flower: 3 s, 1 s)
HEARTBEAT_S = 10  # the node's heartbeat interval: the SuperLink's minimum (Flower: 30). Heartbeats go every ~4 s and
                  # a node that stops sending is declared dead after 2 intervals: 20 s instead of 60 s.


class _ShortSleeps:
    """Stands in for the `time` module inside flwr.supernode.start_client_internal: sleeps are capped."""

    def __init__(self, cap: float):
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def _arg(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def supernode_main(argv: list[str]) -> None:
    """`flower-supernode ARGV` with short idle polls and, with `--isolation process`, a supervised ClientApp
    runtime on the Runtime API at 127.0.0.1:--port."""
    import threading

    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    update_console_handler(timestamps=True, colored=False)  # a log file: when each message came and went
    sci.time = _ShortSleeps(IDLE_POLL_S)  # type: ignore[attr-defined]
    # A message is pullable as soon as its header is on the SuperLink, while the ServerApp still uploads its
    # objects: retry missing ones after 20 ms..0.2 s, not Flower's 1, 2, 4 s.
    sci.pull_objects = functools.partial(sci.pull_objects, initial_backoff=0.02,  # type: ignore[attr-defined]
                                         backoff_cap=0.2)
    fleet.HEARTBEAT_DEFAULT_INTERVAL = hb.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S  # type: ignore[attr-defined]
    if _arg(argv, "--isolation") == "process":
        port = int(_arg(argv, "--port") or 9094)
        threading.Thread(target=_supervise_runtime, args=(port,), name="photon-clientapp-runtime",
                         daemon=True).start()
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def _supervise_runtime(port: int) -> None:
    """Start the ClientApp runtime once the Runtime API listens; restart it whenever it exits."""
    address = f"127.0.0.1:{port}"
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    while True:
        proc = subprocess.Popen([sys.executable, "-m", "photon.launch.warm_node", "clientapp-runtime", address,
                                 str(os.getpid())], stdin=subprocess.DEVNULL)
        code = proc.wait()
        if code == -signal.SIGTERM:
            return  # stopped with the node
        print(f"photon: the ClientApp runtime exited with code {code}; restarting it", file=sys.stderr, flush=True)
        time.sleep(1.0)


class ClientAppRuntime:
    """Runs the SuperNode's ClientApp tasks in this process, one at a time, like `flwr-clientapp` runs one.

    The ClientApp is loaded from the run's app bundle (FAB), as Flower does, and kept while tasks come from the
    same bundle; a task from another bundle drops the previous bundle's modules and loads the new one."""

    def __init__(self, address: str):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address = address
        self._acquirer = RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())
        self._app: tuple[str, object, str] | None = None  # (fab hash, ClientApp, app dir on sys.path)

    def serve(self, poll_s: float = IDLE_POLL_S) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        while True:
            res = self._acquirer.AcquireTask(request)
            if res.HasField("task") and res.token:
                self.run_task(res.token)
            else:
                time.sleep(poll_s)

    def client_app(self, run, fab):
        """The bundle's ClientApp, loaded once per bundle."""
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.config import get_project_config, get_project_dir
        from flwr.supercore.object_ref import load_app

        if self._app is not None and self._app[0] == fab.hash_str:
            return self._app[1]
        app_dir = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
        if not (app_dir / "pyproject.toml").exists():
            install_from_fab(fab.content, skip_prompt=True)
        ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
        top = ref.partition(":")[0].split(".")[0]
        if self._app is not None and self._app[2] in sys.path:
            sys.path.remove(self._app[2])
        self._app = None
        for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[name]  # this process started from a checkout of photon: the bundle's code must win
        import importlib

        importlib.invalidate_caches()
        if str(app_dir) in sys.path:
            sys.path.remove(str(app_dir))
        sys.path.insert(0, str(app_dir))
        app = load_app(ref, LoadClientAppError, app_dir)
        self._app = (fab.hash_str, app, str(app_dir))
        return app

    def run_task(self, token: str) -> None:
        """`flwr.supernode.runtime.run_clientapp`, less the process: pull the task, run the app, push the reply
        (an error reply if the app raised) and the task's final status."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import (
            HeartbeatSender,
            make_task_heartbeat_fn_http,
        )
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)], retry_invoker=retry)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        t0 = time.perf_counter()
        t1 = t2 = t0
        try:
            message, context, run, fab = pull_task_input(client)
            t1 = time.perf_counter()
            reply = self.client_app(run, fab)(message=message, context=context)
            t2 = time.perf_counter()
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # as flwr-clientapp: an error reply, and the runtime goes on
            code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(type(ex)) + ":<'" + str(ex) + "'>"
            if isinstance(ex, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
            log.exception("ClientApp raised an exception")
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001 - the SuperNode times the task out
                log.exception("failed to push the reply")
            retry.max_tries = 1
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            heartbeat.stop()
            client.close()
            log.info("task %s: pulled in %.2f s, ran in %.2f s, pushed in %.2f s", sub_status, t1 - t0, t2 - t1,
                     time.perf_counter() - t2)


def pull_task_input(client):
    """`flwr.supernode.runtime.run_clientapp.pull_task_input` with short retries. A task is claimable as soon as
    the SuperNode has the message's header, before it has pulled the message's objects from the SuperLink:
    Flower's default backoff (1, 2, 4 s ...) is hidden by a new process's start-up, not by a warm runtime."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=0.02, backoff_cap=0.2)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower: the deflated message lacks its id
    return message, context, run, fab


def clientapp_runtime_main(address: str, parent_pid: int) -> None:
    from flwr.supercore.app_utils import start_parent_process_monitor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s photon-clientapp-runtime: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    start_parent_process_monitor(parent_pid)  # the SuperNode went away: so do we
    import torch  # noqa: F401 - the first task need not pay for it

    ClientAppRuntime(address).serve()


if __name__ == "__main__":
    if sys.argv[1:2] == ["supernode"]:
        supernode_main(sys.argv[2:])
    elif sys.argv[1:2] == ["clientapp-runtime"]:
        clientapp_runtime_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m photon.launch.warm_node supernode FLOWER-SUPERNODE-ARGS... | "
                 "clientapp-runtime HOST:PORT PARENT_PID")
