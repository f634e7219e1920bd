"""Flower runtime: the same rounds on Flower's Deployment Engine (one SuperLink, one SuperNode per client).

Nothing of a round is re-implemented here. Both sides build the run exactly as the in-process simulation
does (`fedlora.run.Run`: model, adapters, `method.setup`), each with only the data it holds: a SuperNode its
own file (`--data`, `partition.scheme: files`), the ServerApp none but its optional own test set
(`eval.server_test`). Then

    ServerApp (SuperLink side)                      ClientApp (SuperNode side, client i)
    query: who are you, which labels?        --->   partition-id, the labels of its own file
    Server.sample()
    first contact (CE-LoRA): query describe  --->   its data descriptor, from its own training data
    Server.download(i, t)                    --->   train message: Download as an ArrayRecord
                                                    client_fit(...) on the persisted ClientState
    Upload  <---  reply (ArrayRecord + n_examples)  state saved to disk before the reply
    Server.finish_round(t, downloads, uploads)      (validation, aggregation, raw byte accounting)
    global test (single-model methods)      --->    evaluate message: Method.download(i, t + 1) applied
    metrics.jsonl / summary.json / states/  <---    per-client metrics on the client's own test split

Every download is built per client (`Server.download(cid, t)` -> `Method.download`), so a method that
personalizes what it sends (CE-LoRA's C̄_i) works unchanged: each node gets its own message.

Clients: a SuperNode says which client it is with its node config (`partition-id`, `num-partitions`,
`data` / `test` / `test-fraction` / column names for its own file, optional `state-dir` and `threads`);
the ServerApp learns the mapping from node ids with a `query` message, and again whenever a node
(re)appears, so a restarted SuperNode (new node id) takes over its client. The label space is
`task.labels` or the union of the labels the nodes report, sent to the nodes with every message.
Without `data` a node loads the shared task and keeps its partition (experiments only).

Client state: a client's `ClientState` (its copy of the server tensors, its personal factors), its batch
stream position, its sync mark and its last upload live in `<state-dir>/run_<run key>/client_<i>/`
(`state.safetensors`, whose header also holds `state.json`'s content), written atomically after every
message that changes them. Flower's `Context.state` is in memory only; this survives a restart. A
message is idempotent: a retried round returns the stored upload instead of training twice, and a
client whose sync mark differs from the server's (it lost its disk, or missed a download) answers
`resync` and gets the tensors it is missing. The run key (run config `run-key`) outlives Flower's run id:
the ServerApp checkpoints every round (the in-process checkpoint chain, server part), and a resumed run
(`fedlora flower run --resume RUN_DIR`, a new Flower run) finds every client's state again.

Bytes: `up_*` / `down_*` are counted by `Server.finish_round` exactly as in process (raw tensor bytes
and safetensors size). What crosses Flower is added as `flower_*` columns: `*_array_bytes` (the
ArrayRecords' payload, `ArrayRecord.count_bytes`) and `*_message_bytes` (every serialized object of the
messages, records and metadata included, retries included; HTTP framing and TLS not included).
Flower's arrays are NumPy arrays, which have no bfloat16: such tensors are cast to float32 on the wire
(the exact value, 2x the bytes) and cast back on arrival; the raw columns count the tensors' own dtype.

Randomness: client training noise is seeded per (seed, client, round) in `client_fit`, sampling and the
simulated `federation.dropout_rate` use the server's generators, so a Flower run reproduces the
in-process run of the same config (see tests/test_flower.py, tests/test_flower_silos.py).
"""

from __future__ import annotations

from .client import ClientStore, client_app
from .patches import fast_object_pulls, serve_client_tasks
from .server import FlowerServer, server_app
from .wire import from_record, to_record

__all__ = ["ClientStore", "FlowerServer", "client_app", "fast_object_pulls", "from_record", "serve_client_tasks",
           "server_app", "to_record"]
