"""Split a labelled dataset into the part to keep (retain) and the part to unlearn (forget)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np

LabelSpec = int | str | np.integer


def _class_names(dataset: datasets.Dataset, label_column: str) -> list[str] | None:
    feature = dataset.features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _check_column(dataset: datasets.Dataset, label_column: str) -> None:
    if label_column not in dataset.column_names:
        raise ValueError(
            f"label_column {label_column!r} is not a column of the dataset; columns: {dataset.column_names}"
        )


def labels_to_ids(
    labels: LabelSpec | Sequence[LabelSpec] | None,
    names: Sequence[str] | None,
    arg_name: str = "labels",
    no_names_hint: str = "the labels have no class names",
) -> list[int]:
    """Turn ints, digit strings and (case-insensitive) class ``names`` into unique integer label ids.

    With ``names`` the ids are also checked to lie in ``range(len(names))``. Errors are ``ValueError`` naming
    ``arg_name``; ``no_names_hint`` explains why a name cannot be resolved when ``names`` is None.
    """
    if isinstance(labels, (str, int, np.integer)):
        labels = [labels]
    if labels is None or len(labels) == 0:
        raise ValueError(f"{arg_name} must name at least one label")
    lookup = {name.strip().lower(): i for i, name in enumerate(names or [])}
    ids: list[int] = []
    for label in labels:
        if isinstance(label, (bool, np.bool_)):
            raise ValueError(f"{arg_name} contains a boolean {label!r}; give label ids or class names")
        if isinstance(label, (int, np.integer)):
            label_id = int(label)
        elif isinstance(label, str) and label.strip().isdigit():
            label_id = int(label.strip())
        elif isinstance(label, str):
            if names is None:
                raise ValueError(f"{arg_name} contains the name {label!r}, but {no_names_hint}; give integer label ids")
            if label.strip().lower() not in lookup:
                raise ValueError(f"{arg_name} contains unknown class name {label!r}; valid names: {list(names)}")
            label_id = lookup[label.strip().lower()]
        else:
            raise ValueError(f"{arg_name} entries must be ints or strings, got {type(label).__name__}: {label!r}")
        if names is not None and not 0 <= label_id < len(names):
            raise ValueError(
                f"{arg_name} contains label id {label_id}, out of range for {len(names)} classes; valid names: "
                f"{list(names)}"
            )
        if label_id not in ids:
            ids.append(label_id)
    return ids


def resolve_label_ids(
    dataset: datasets.Dataset,
    label_column: str,
    labels: LabelSpec | Sequence[LabelSpec],
    arg_name: str = "labels",
) -> list[int]:
    """:func:`labels_to_ids` with the class names of ``dataset[label_column]`` (a ``ClassLabel``, if it is one).

    Errors are ``ValueError`` naming ``label_column`` or ``arg_name`` (the caller's argument name).
    """
    _check_column(dataset, label_column)
    return labels_to_ids(labels, _class_names(dataset, label_column), arg_name,
                         no_names_hint=f"column {label_column!r} is not a ClassLabel")


def _label_array(dataset: datasets.Dataset, label_column: str) -> np.ndarray:
    """The label column as a numpy array, read from Arrow without decoding any other column."""
    # Slice the whole column: indexing by name returns a lazy Column whose np.asarray iterates rows.
    return np.asarray(dataset.select_columns([label_column]).with_format("numpy")[:][label_column])


def split_forget_retain(
    dataset: datasets.Dataset,
    label_column: str = "label",
    forget_labels: LabelSpec | Sequence[LabelSpec] | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Return ``(retain_dataset, forget_dataset)``: rows whose label is / is not in ``forget_labels``.

    Row order is preserved in both parts. Raises ``ValueError`` when a forget label occurs in no row,
    or when either part would be empty.
    """
    ids = resolve_label_ids(dataset, label_column, forget_labels if forget_labels is not None else [], "forget_labels")
    names = _class_names(dataset, label_column)
    values = _label_array(dataset, label_column)
    present = set(np.unique(values).tolist()) if values.size else set()
    absent = [i for i in ids if i not in present]
    if absent:
        shown = [f"{i} ({names[i]!r})" if names else str(i) for i in absent]
        raise ValueError(f"forget_labels {', '.join(shown)} occur in no row of the dataset (column {label_column!r})")
    forget_mask = np.isin(values, np.asarray(ids))
    forget_idx = np.flatnonzero(forget_mask)
    retain_idx = np.flatnonzero(~forget_mask)
    if forget_idx.size == 0:
        raise ValueError(f"forget_labels {ids} select no rows: the forget set would be empty")
    if retain_idx.size == 0:
        raise ValueError(f"forget_labels {ids} cover every row of the dataset: the retain set would be empty")
    return dataset.select(retain_idx), dataset.select(forget_idx)


def exclude_labels(
    dataset: datasets.Dataset, label_column: str, labels: LabelSpec | Sequence[LabelSpec]
) -> datasets.Dataset:
    """The dataset without the rows labelled ``labels`` (the "gold standard" re-training set).

    Same rules and errors as :func:`split_forget_retain` (messages refer to ``forget_labels``).
    """
    retain, _ = split_forget_retain(dataset, label_column=label_column, forget_labels=labels)
    return retain
