"""The model registry at `registry.uri` (a local directory or s3://bucket/prefix): the champion
(the model in use) and every promotion decision ever made. components/promote.py decides;
`Registry.promote` records the decision and moves the champion.

Layout, as keys of a RunStore (components/run_store.py) at the registry's URI:
- history/000000000001.json, ...: one entry per decision, numbered from 1, never rewritten:
  {seq, attempt, decided_at, decision, champion}; `champion` is the model in use after it
  (null until the first promotion). The newest entry is the truth.
- champion.json: {seq, champion, updated_at}, a copy of the newest entry's champion for readers
  that want one fixed key. It only moves forward; after a crash between the two writes it lags
  one decision, and the next promotion brings it up to date.
- wandb_reports/<group>.json: {group, entity, project, id, url, ...}, the W&B Report of a W&B
  group's history (components/wandb_review.py), so the next run updates that report.

Atomicity: an entry is created only if its number is free (S3 `If-None-Match: *`, locally
link(2)), so of two promotions racing for number n exactly one lands; the other reads the new
newest entry, decides again against the champion it names and takes n + 1. Nothing is lost and
the pointer never moves on a stale comparison. champion.json is replaced only if unchanged since
read (S3 `If-Match: <ETag>`, locally a compare-and-swap under flock).

    python -m components.registry s3://bucket/registry [--history]   # prints the champion (JSON)
"""

import argparse
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Callable, List, Optional

from components import storage
from components.config import StorageConfig
from components.errors import StorageError, exit_on_user_error
from components.run_store import RunStore, join_uri

POINTER = "champion.json"
HISTORY = "history/"
ENTRY_KEY = re.compile(r"history/(\d{12})\.json")
# Promotions that may land between this one's read and write before it gives up (each lost race
# means another promotion landed: a schedule with max_concurrency=1 never gets near this).
MAX_RACES = 20
REPORTS = "wandb_reports/"
RESTORE_ENTRY = "the history is append-only: restore the entry from a backup; nothing was changed"
REWRITE_POINTER = "it copies the newest history entry: delete it and the next promotion writes it again"


def entry_key(seq: int) -> str:
    return f"{HISTORY}{seq:012d}.json"


def report_key(group: str) -> str:
    # a readable key; the group itself is inside (two groups that map to one key: the later wins)
    return f"{REPORTS}{re.sub(r'[^A-Za-z0-9._-]', '_', group)}.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def encode(obj) -> bytes:
    return (storage.dumps(obj, indent=2) + "\n").encode()


class Registry:
    def __init__(self, store: RunStore):
        self.store, self.uri = store, store.uri

    @classmethod
    def open(cls, uri: str, settings: Optional[StorageConfig] = None) -> "Registry":
        return cls(RunStore.open(uri, settings))

    # -- reading -------------------------------------------------------------------------------
    def history(self) -> List[dict]:
        """Every decision, oldest first. A missing number means someone removed an entry: refused."""
        entries = [self._entry(key) for key in self._entry_keys()]
        for expected, entry in enumerate(entries, start=1):
            if entry["seq"] != expected:
                raise StorageError(f"{join_uri(self.uri, entry_key(expected))}: missing, but later entries "
                                   f"exist; {RESTORE_ENTRY}")
        return entries

    def head(self) -> Optional[dict]:
        """The newest decision, or None for an empty registry."""
        keys = self._entry_keys()
        return self._entry(keys[-1]) if keys else None

    def champion(self) -> Optional[dict]:
        """The model in use (from the newest entry), or None before the first promotion."""
        head = self.head()
        return head["champion"] if head else None

    def pointer(self) -> Optional[dict]:
        """champion.json as stored, or None before the first decision."""
        tagged = self.store.read_tagged(POINTER)
        return None if tagged is None else self._parse_pointer(tagged[0])

    # -- writing -------------------------------------------------------------------------------
    def promote(self, candidate: Optional[dict], decide: Callable[[Optional[dict]], dict]) -> dict:
        """Record one decision. `decide(champion)` compares the candidate (the new model's record:
        run_id, model_uri, metric, value, ...; None when it has no model) with the champion in
        use (None if there is none) and returns the decision, whose `promoted` says whether the
        candidate becomes the champion. After a lost race it is called again with the champion
        that won. Returns the entry written."""
        self.pointer()  # a corrupted pointer fails here, before anything is written
        attempt = uuid.uuid4().hex  # tells our own entry apart after a retried request (see below)
        for _ in range(MAX_RACES):
            head = self.head()
            champion = head["champion"] if head else None
            seq = head["seq"] + 1 if head else 1
            decision = decide(champion)
            if decision["promoted"]:
                champion = {**candidate, "seq": seq, "promoted_at": now()}
            entry = {"seq": seq, "attempt": attempt, "decided_at": now(), "decision": decision, "champion": champion}
            key = entry_key(seq)
            # False can also mean our own write landed and its response was lost (the request was
            # retried and found the entry): then the entry is ours
            if self.store.create_bytes(key, encode(entry)) or self._entry(key)["attempt"] == attempt:
                self._move_pointer(entry)
                return entry
        raise StorageError(f"{self.uri}: {MAX_RACES} other promotions landed while this one was deciding; "
                           "nothing was recorded for it: run promote again")

    def _move_pointer(self, entry: dict) -> None:
        data = encode({"seq": entry["seq"], "champion": entry["champion"], "updated_at": now()})
        for _ in range(MAX_RACES):
            tagged = self.store.read_tagged(POINTER)
            if tagged is None:
                if self.store.create_bytes(POINTER, data):
                    return
            elif self._parse_pointer(tagged[0])["seq"] >= entry["seq"]:
                return  # a newer decision moved it already: never move it back
            elif self.store.replace_bytes(POINTER, data, tagged[1]):
                return
        raise StorageError(f"{join_uri(self.uri, POINTER)}: kept changing while decision {entry['seq']} was copied "
                           "to it; the history holds the decision, the next promotion brings the pointer up to date")

    # -- the W&B Report of a group (components/wandb_review.py) ---------------------------------
    def report_link(self, group: str) -> Optional[dict]:
        """Where the group's W&B Report is, as keep_report_link stored it; None: none yet."""
        tagged = self.store.read_tagged(report_key(group))
        if tagged is None:
            return None
        link = _parse(tagged[0], join_uri(self.uri, report_key(group)), "delete it: the next report is a new one")
        return link if link.get("group") == group else None

    def keep_report_link(self, group: str, link: dict) -> None:
        self.store.put_bytes(report_key(group), encode({**link, "group": group, "updated_at": now()}))

    # -- parsing -------------------------------------------------------------------------------
    def _entry_keys(self) -> List[str]:
        return [key for key in self.store.list(HISTORY) if ENTRY_KEY.fullmatch(key)]  # zero-padded: sorted by seq

    def _entry(self, key: str) -> dict:
        where = join_uri(self.uri, key)
        entry = _parse(self.store.get_bytes(key), where, RESTORE_ENTRY)
        seq = int(ENTRY_KEY.fullmatch(key).group(1))
        if not {"seq", "attempt", "decision", "champion"} <= set(entry) or entry["seq"] != seq:
            raise StorageError(f"{where}: corrupted: not the history entry of decision {seq}; {RESTORE_ENTRY}")
        return entry

    def _parse_pointer(self, data: bytes) -> dict:
        where = join_uri(self.uri, POINTER)
        pointer = _parse(data, where, REWRITE_POINTER)
        if not isinstance(pointer.get("seq"), int) or "champion" not in pointer:
            raise StorageError(f"{where}: corrupted: not a champion pointer (no seq or champion); {REWRITE_POINTER}")
        return pointer


def _parse(data: bytes, where: str, fix: str) -> dict:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise StorageError(f"{where}: corrupted: not valid JSON ({exc}); {fix}") from None
    if not isinstance(obj, dict):
        raise StorageError(f"{where}: corrupted: not a JSON object; {fix}")
    return obj


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", help="the registry (registry.uri): a local directory or s3://bucket/prefix")
    parser.add_argument("--history", action="store_true", help="print every decision, oldest first")
    parser.add_argument("--endpoint-url", help="S3 endpoint (MinIO, moto); default: AWS")
    args = parser.parse_args(argv)
    registry = Registry.open(args.uri, StorageConfig(endpoint_url=args.endpoint_url))
    print(storage.dumps(registry.history() if args.history else registry.champion(), indent=2))


if __name__ == "__main__":
    main()
