"""The duplicate rule: copies of one scan are resolved by rule, never by hand-editing the data.

Real cohorts come with copies: the same export filed twice, or filed under two labels. Ingest applies this rule once
every file has its manifest row (one policy, one place; STYLE.md 15):

* **Exact copies** are files with the same raw sha256, or accepted files whose decoded pixels are identical after
  ingest's processing (the same ``pixel_sha256``: e.g. one image saved as PNG and as TIFF). Copies are grouped
  transitively.
* A group whose files all end up in **one class** (after ``data.class_map``) keeps one scan, the copy whose
  ``source`` sorts first (a rule that does not depend on file order or machine); every other copy gets status
  ``duplicate`` with ``duplicate_of`` naming the kept copy. Duplicates are not quarantines.
* A group whose files are labelled into **different classes** — or into a class and ``drop`` — is a label
  conflict: the labels of that content cannot be trusted, so *every* copy is quarantined ``label_conflict``.
* A group of files the map drops stays dropped.

Near-duplicates (perceptual hash confirmed by SSIM) are not exact copies: validate finds them and the split puts
the patients that share one in one group (:mod:`spinedxa.split`), so no content is ever in the training part and the
held-out part of one fold.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

from spinedxa.task import DROP

#: Manifest statuses this rule assigns (besides ``quarantined`` with reason ``label_conflict``).
DUPLICATE = "duplicate"
LABEL_CONFLICT = "label_conflict"
#: Statuses of rows whose label was resolved by the task (the candidates of the rule).
_RESOLVED = ("accepted", "dropped")
#: Columns an accepted row holds that a duplicate or conflicting copy must not (it has no image of its own).
IMAGE_COLUMNS = ("image", "roi")

Row = MutableMapping[str, Any]


class _Groups:
    """Union-find over row positions."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def outcome(row: Row) -> str:
    """A row's task label: its class when accepted, :data:`spinedxa.task.DROP` when the map dropped it."""
    return DROP if row["status"] == "dropped" else str(row["label"])


def copy_groups(rows: Sequence[Row]) -> list[list[int]]:
    """Positions of ``rows`` that are exact copies of each other (groups of two or more), each sorted by source.

    Raw sha256 links every resolved row (accepted or dropped); ``pixel_sha256`` links accepted rows (dropped files
    are never decoded).
    """
    candidates = [i for i, r in enumerate(rows) if r["status"] in _RESOLVED and r.get("sha256")]
    groups = _Groups(len(rows))
    for key in ("sha256", "pixel_sha256"):
        first: dict[str, int] = {}
        for i in candidates:
            value = rows[i].get(key) or ""
            if not value or (key == "pixel_sha256" and rows[i]["status"] != "accepted"):
                continue
            if value in first:
                groups.union(first[value], i)
            else:
                first[value] = i
    members: dict[int, list[int]] = defaultdict(list)
    for i in candidates:
        members[groups.find(i)].append(i)
    out = [sorted(m, key=lambda i: rows[i]["source"]) for m in members.values() if len(m) > 1]
    return sorted(out, key=lambda m: rows[m[0]]["source"])


def _how(rows: Sequence[Row], a: int, b: int) -> str:
    return "raw bytes" if rows[a]["sha256"] == rows[b]["sha256"] else "decoded pixels"


def resolve(rows: Sequence[Row]) -> dict[str, int]:
    """Apply the rule to manifest rows in place (see the module docstring).

    Returns:
        Counts: ``duplicate_groups`` (groups of copies), ``duplicates`` (rows made ``duplicate``),
        ``label_conflict_groups`` and ``label_conflicts`` (rows quarantined ``label_conflict``).
    """
    counts = {"duplicate_groups": 0, "duplicates": 0, "label_conflict_groups": 0, "label_conflicts": 0}
    for group in copy_groups(rows):
        labels = sorted({outcome(rows[i]) for i in group})
        if len(labels) > 1:
            found = sorted({str(rows[i].get("label_found") or rows[i]["label"]) for i in group})
            counts["label_conflict_groups"] += 1
            for i in group:
                others = [rows[j]["source"] for j in group if j != i]
                _clear_images(rows[i])
                rows[i].update(status="quarantined", reason=(
                    f"{LABEL_CONFLICT}: the same content ({_how(rows, i, [j for j in group if j != i][0])}) is "
                    f"filed under the labels {found} (-> {labels} after data.class_map) in {len(group)} files; "
                    f"the other copies: {', '.join(others)}"), duplicate_of="")
                counts["label_conflicts"] += 1
            continue
        if labels == [DROP]:
            continue  # every copy is dropped by the map; each keeps its own dropped row
        kept = next(i for i in group if rows[i]["status"] == "accepted")
        counts["duplicate_groups"] += 1
        for i in group:
            if i == kept:
                continue
            _clear_images(rows[i])
            rows[i].update(status=DUPLICATE, duplicate_of=rows[kept]["source"],
                           reason=f"{DUPLICATE}: same {_how(rows, i, kept)} as {rows[kept]['source']} (kept)")
            counts["duplicates"] += 1
    return counts


def _clear_images(row: Row) -> None:
    for column in IMAGE_COLUMNS:
        if column in row:
            row[column] = ""


def unreferenced_images(rows: Iterable[Row], written: Iterable[str]) -> list[str]:
    """The image files in ``written`` that no accepted row refers to any more (to delete after :func:`resolve`)."""
    kept = {r[c] for r in rows if r["status"] == "accepted" for c in IMAGE_COLUMNS if r.get(c)}
    return sorted(set(written) - kept)
