"""The Flower edge: a `protocol.Wire` to and from a Flower `RecordDict`, and nothing else.

The header travels as one JSON string in a `ConfigRecord`; each payload as one raw `uint8` `Array` (no
`.npy` wrapping, nothing pickled) in an `ArrayRecord`, with its layout (JSON) in a second `ConfigRecord`.
Flower moves every array as its own objects, so a few arrays per message instead of one per tensor keeps a
message's overhead small. Reading a record is the first check of an untrusted reply: a record that is not
exactly this shape is a `CodecError` naming what is wrong, which the server turns into a rejected reply.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from photon.federation.codec import CodecError, Payload
from photon.federation.protocol import Wire

HEADER, PAYLOADS, LAYOUTS, META = "header", "payloads", "layouts", "meta"
RAW = "raw"


def wire_to_content(wire: Wire) -> RecordDict:
    arrays = {name: Array(dtype=str(p.data.dtype), shape=tuple(p.data.shape), stype=RAW, data=p.as_bytes())
              for name, p in wire.payloads.items()}
    layouts = {name: p.layout_json() for name, p in wire.payloads.items()}
    records = {HEADER: ConfigRecord({"json": wire.header}), PAYLOADS: ArrayRecord(arrays), LAYOUTS: ConfigRecord(layouts)}
    if wire.meta:
        records[META] = ConfigRecord(dict(wire.meta))
    return RecordDict(records)


def content_to_wire(content: RecordDict) -> Wire:
    """The `Wire` inside a received record; CodecError if the record is not shaped as `wire_to_content` makes."""
    try:
        header = content[HEADER]["json"]
        arrays, layouts = content[PAYLOADS], content[LAYOUTS]
    except (KeyError, TypeError) as e:
        raise CodecError(f"message lacks its {e} record") from None
    if not isinstance(header, str) or not isinstance(arrays, ArrayRecord) or not isinstance(layouts, ConfigRecord):
        raise CodecError("message records have the wrong types")
    if set(arrays) != set(layouts):
        raise CodecError(f"payloads {sorted(arrays)} and layouts {sorted(layouts)} differ")
    payloads = {}
    for name in arrays:
        array = arrays[name]
        if array.dtype != "uint8" or array.stype != RAW or len(array.shape) != 1 or \
                array.shape[0] != len(array.data):
            raise CodecError(f"payload {name!r} is not raw bytes ({array.dtype}, {array.stype}, {array.shape})")
        layout = layouts[name]
        if not isinstance(layout, str):
            raise CodecError(f"layout of payload {name!r} is not a string")
        payload = Payload.from_parts(layout, np.frombuffer(array.data, dtype=np.uint8))
        payload.buffer = array.data
        payloads[name] = payload
    meta = {}
    if META in content:
        record = content[META]
        if not isinstance(record, ConfigRecord) or not all(isinstance(v, str) for v in record.values()):
            raise CodecError("message meta record is malformed")
        meta = dict(record)
    return Wire(header, payloads, meta)
