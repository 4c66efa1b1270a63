"""The `direct` KV data plane: the prefill worker keeps a handoff's chunks in memory until its lease ends and serves
them on its worker port (`GET /kv/<handoff-id>/<i>`, `DELETE /kv/<handoff-id>`); Redis holds only the descriptor.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Response

DIRECT_PATH = "/kv"


class DirectStore:
    """Chunks kept in the prefill worker's memory for the `direct` data plane, each handoff until its lease ends."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[float, list[bytes]]] = {}

    def put(self, handoff_id: str, chunks: list[bytes], deadline_s: float) -> None:
        self.evict_expired()
        self._items[handoff_id] = (deadline_s, chunks)

    def get(self, handoff_id: str, index: int) -> bytes | None:
        item = self._items.get(handoff_id)
        if item is None or item[0] < time.time() or not 0 <= index < len(item[1]):
            return None
        return item[1][index]

    def release(self, handoff_id: str) -> bool:
        return self._items.pop(handoff_id, None) is not None

    def evict_expired(self) -> None:
        now = time.time()
        for hid in [h for h, (deadline, _) in self._items.items() if deadline < now]:
            del self._items[hid]

    @property
    def bytes_held(self) -> int:
        return sum(len(c) for _, chunks in self._items.values() for c in chunks)


def direct_router(store: DirectStore) -> APIRouter:
    """The `direct` data plane endpoints of a prefill worker, mounted on its worker port."""
    router = APIRouter()

    @router.get(DIRECT_PATH + "/{handoff_id}/{index}")
    def get_chunk(handoff_id: str, index: int) -> Response:
        data = store.get(handoff_id, index)
        if data is None:
            raise HTTPException(404, f"no chunk {index} of handoff {handoff_id}")
        return Response(content=data, media_type="application/octet-stream")

    @router.delete(DIRECT_PATH + "/{handoff_id}")
    def release(handoff_id: str) -> Response:
        return Response(status_code=204 if store.release(handoff_id) else 404)

    return router
