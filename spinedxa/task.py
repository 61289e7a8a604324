"""The task: which classes the models learn, and how the labels a cohort comes with map onto them.

One policy, one place (STYLE.md 15). Every stage asks this module instead of testing ``len(classes) == 2`` on its own:

* **Classes** (``data.classes``): ordered. Two classes are the paper's binary task (the second is the *positive*
  class, osteoporosis); three or more are an *ordinal* multi-class task, least to most severe, e.g. the WHO's
  normal < osteopenia < osteoporosis (WHO 1994, Technical Report Series 843). :attr:`Task.kind` says which, and the
  metrics, calibration, report and predictions dispatch on it (as scikit-learn's metrics dispatch on
  ``type_of_target``).
* **The label map** (``data.class_map``): real cohorts come labelled in their own words (folder names or a
  ``labels.csv``), most often the WHO's three categories. A label found in the data is, in this order: one of the
  classes (kept as is); a key of the map, mapped onto a class or ``drop`` (the file keeps its manifest row with
  status ``dropped``; it is not a quarantine); anything else is ``unknown`` (quarantined ``unknown_label``, as
  before). An entry mapping a class onto itself changes nothing (a profile that adds a class overrides the default
  map's entry for it that way: ``profiles/who3.yaml``). ``{osteopenia: osteoporosis}`` gives "low BMD vs normal"; ``{osteopenia: drop}`` leaves the osteopenic
  scans out; ``{osteopenia: normal}`` (the default) gives the paper's "osteoporosis vs not".
* **The positive class** is the last, most severe class: ``osteoporosis`` in the binary and WHO tasks. Curves and
  thresholded binary figures (ROC, precision-recall, calibration plots) are drawn for it against the rest.

This module imports nothing heavy: every stage may ask it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

#: The value of a ``data.class_map`` entry that leaves a label out of the task (the file's manifest row: dropped).
DROP = "drop"
#: Task kinds: two classes (negative, positive) or three or more ordered classes.
BINARY, ORDINAL = "binary", "ordinal"
TaskKind = Literal["binary", "ordinal"]
#: The WHO's densitometric categories, least to most severe (T >= -1, -2.5 < T < -1, T <= -2.5).
WHO_CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")


class TaskError(ValueError):
    """The classes or the label map are inconsistent (the message names the key and what is allowed)."""


@dataclass(frozen=True)
class Resolution:
    """What the task makes of one label found in the data.

    Attributes:
        outcome: ``class`` (a class of the task), ``drop`` (the map leaves it out), ``unknown`` or ``empty``.
        cls: the class, for ``class``; ``""`` otherwise.
        found: the label as found (folder name or labels.csv value).
    """

    outcome: Literal["class", "drop", "unknown", "empty"]
    cls: str
    found: str

    @property
    def mapped(self) -> str:
        """The task label (a class, or :data:`DROP`), ``""`` when the label is unknown or empty."""
        return self.cls if self.outcome == "class" else DROP if self.outcome == "drop" else ""


@dataclass(frozen=True)
class Task:
    """The classes the models learn and the map from the labels found in the data.

    Args:
        classes: ordered class names (>= 2, distinct); the last is the positive / most severe class.
        class_map: label found -> class or :data:`DROP`.
    """

    classes: tuple[str, ...]
    class_map: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.classes, self.class_map)

    # ---------------------------------------------------------------------------------------------- shape

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def kind(self) -> TaskKind:
        """``binary`` for two classes, ``ordinal`` for three or more (ordered from least to most severe)."""
        return BINARY if len(self.classes) == 2 else ORDINAL

    @property
    def is_binary(self) -> bool:
        return self.kind == BINARY

    @property
    def positive(self) -> str:
        """The positive class (binary) or the most severe class (ordinal): the last one."""
        return self.classes[-1]

    @property
    def positive_index(self) -> int:
        return len(self.classes) - 1

    def index(self, name: str) -> int:
        """The class index of ``name``.

        Raises:
            TaskError: ``name`` is not a class.
        """
        try:
            return self.classes.index(name)
        except ValueError:
            raise TaskError(f"label {name!r} is not one of the classes {list(self.classes)}") from None

    # ---------------------------------------------------------------------------------------------- labels

    def resolve(self, label: str) -> Resolution:
        """Map one label found in the data (see the module docstring for the order of the rules)."""
        found = label.strip()
        if not found:
            return Resolution("empty", "", found)
        if found in self.classes:
            return Resolution("class", found, found)
        target = self.class_map.get(found)
        if target == DROP:
            return Resolution("drop", "", found)
        if target is not None:
            return Resolution("class", target, found)
        return Resolution("unknown", "", found)

    def decide(self, prob: "np.ndarray", threshold: float) -> "np.ndarray":
        """The predicted class index of each row of an ``N x K`` probability matrix: P(positive) >= ``threshold``
        for the binary task, the most probable class for the ordinal one."""
        import numpy as np

        p = np.asarray(prob, dtype=float)
        if self.is_binary:
            return (p[:, -1] >= threshold).astype(int)
        return p.argmax(axis=1).astype(int)

    def known_labels(self) -> list[str]:
        """Every label this task accepts in the data: the classes, then the map's keys."""
        return [*self.classes, *(k for k in self.class_map if k not in self.classes)]

    # ---------------------------------------------------------------------------------------------- words

    def describe(self) -> str:
        """The task in words, e.g. ``binary: normal vs osteoporosis`` or ``ordinal, 3 classes: normal < ...``."""
        if self.is_binary:
            return f"binary: {self.classes[0]} vs {self.classes[1]}"
        return f"ordinal, {len(self.classes)} classes: " + " < ".join(self.classes)

    def map_lines(self) -> list[str]:
        """The label map in words, one entry per line (``osteopenia -> normal``, ``osteopenia -> dropped``)."""
        return [f"{k} -> {'dropped' if v == DROP else v}" for k, v in sorted(self.class_map.items())]

    def class_members(self, cls: str) -> list[str]:
        """The labels found in data that end up in class ``cls``: itself and every map key pointing at it."""
        return [cls, *sorted(k for k, v in self.class_map.items() if v == cls)]


def check(classes: Sequence[str], class_map: Mapping[str, str]) -> None:
    """Check ``data.classes`` and ``data.class_map`` together.

    Raises:
        TaskError: fewer than two or repeated classes, a class name that is not a plain folder name, a map value
            that is neither a class nor ``drop``, or a map key that is itself a class (it would never be mapped).
    """
    classes = tuple(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise TaskError(f"data.classes: {list(classes)}; allowed: at least two distinct class names")
    for name in classes:
        if not name or name != name.strip() or "/" in name or name.startswith(".") or name == DROP:
            raise TaskError(f"data.classes: {name!r} is not a usable class name; allowed: a plain folder name "
                            f"(no '/', no leading '.', not {DROP!r})")
    allowed = [*classes, DROP]
    for key, value in class_map.items():
        if not key.strip():
            raise TaskError("data.class_map: an empty label cannot be mapped; allowed: the labels found in the data")
        if key in classes and value != key:
            raise TaskError(f"data.class_map.{key}: {key!r} is one of data.classes, so it is never mapped; remove "
                            "the entry (or the class)")
        if value not in allowed:
            raise TaskError(f"data.class_map.{key}: {value!r} is not a class; allowed: one of {allowed}")
