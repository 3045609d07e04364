"""The DVSA lookup tables (``item_detail``, ``item_group``, ``rfr_location``) and the defect labels built from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from training import mot_labels
from training.dvsa_columns import _col, _int, _int16, _int_exact, keep_usable
from training.dvsa_files import UNUSED_KINDS, Source, check_damage, iter_raw
from training.dvsa_report import BulkFormatError, BulkReport, FileReport


@dataclass
class Lookups:
    detail: pd.DataFrame  # one row per (rfr_id, test_class_id)
    group_root: dict[tuple[int, int], str]  # (test_item_id, class) → top-level item_group name
    locations: dict[int, str]


#: Each lookup's key column: a row without an integer there is a bad row.
_KEYS = {"item_detail": "rfr_id", "item_group": "test_item_id", "rfr_location": "location_id"}


def load_lookups(sources: list[Source], report: BulkReport) -> Lookups:
    """The lookup tables among ``sources`` (item_detail is required), their files' counts in ``report``."""
    frames: dict[str, list[pd.DataFrame]] = {k: [] for k in _KEYS}
    details = [src.name for src in sources if src.kind == "item_detail"]
    for src in sources:
        if src.kind in UNUSED_KINDS:
            report.unused_tables.append(src.name)
        if src.kind in frames:
            fr = FileReport(src.name, src.kind, src.delimiter)
            report.files.append(fr)
            key = _KEYS[src.kind]
            for raw in iter_raw(src, fr):
                usable = keep_usable(pd.DataFrame({key: _int_exact(raw[key])}), fr, (key,))
                check_damage(src, fr)
                frames[src.kind].append(raw.loc[usable.index])
    if not any(len(f) for f in frames["item_detail"]):
        raise BulkFormatError(f"{details[0]}:2: the item_detail table holds no rows with a usable rfr_id")
    detail = pd.concat(frames["item_detail"], ignore_index=True)
    detail = pd.DataFrame(
        {
            "rfr_id": _int_exact(detail["rfr_id"]),  # exactly: ids above 2**53 stay apart
            # a class beyond int16 is missing (class 4), as in test_result, on both paths
            "test_class_id": _int16(_int_exact(_col(detail, "test_class_id"))),
            "test_item_id": _int_exact(_col(detail, "test_item_id")),
            "rfr_desc": _col(detail, "rfr_desc"),
            "rfr_insp_manual_desc": _col(detail, "rfr_insp_manual_desc"),
            "rfr_advisory_text": _col(detail, "rfr_advisory_text"),
            "rfr_deficiency_category": _col(detail, "rfr_deficiency_category"),
        }
    )
    detail = detail.drop_duplicates(["rfr_id", "test_class_id"], keep="last")
    group_root: dict[tuple[int, int], str] = {}
    if frames["item_group"]:
        g = pd.concat(frames["item_group"], ignore_index=True)
        ids, cls, parents = (
            _int_exact(g["test_item_id"]),
            _int16(_int_exact(_col(g, "test_class_id"))),
            _int_exact(_col(g, "parent_id")),  # without parents every group is its own root
        )
        nodes = {
            (int(i), int(c)): (int(p) if pd.notna(p) else 0, str(n or ""))
            for i, c, p, n in zip(ids, cls, parents, _col(g, "item_name"), strict=True)
        }
        for i, c in nodes:
            node, seen = (i, c), set()
            while nodes.get(node, (0, ""))[0] and node not in seen:
                seen.add(node)
                node = (nodes[node][0], c)
            group_root[(i, c)] = nodes.get(node, (0, ""))[1]
        detail, report.item_named_rfrs = _with_item_names(detail, {k: name for k, (_, name) in nodes.items()})
    locations: dict[int, str] = {}
    if frames["rfr_location"]:
        loc = pd.concat(frames["rfr_location"], ignore_index=True)
        parts = [c for c in ("lateral", "longitudinal", "vertical", "horizontal") if c in loc.columns]
        for lid, *vals in zip(_int(loc["location_id"]), *(loc[c] for c in parts), strict=True):
            locations[int(lid)] = " ".join(v.strip() for v in vals if v and v.strip())
    return Lookups(detail, group_root, locations)


def _with_item_names(detail: pd.DataFrame, names: dict[tuple[int, int], str]) -> tuple[pd.DataFrame, int]:
    """``detail`` with each ``rfr_desc`` / ``rfr_advisory_text`` that is a fragment (it starts in lower
    case: ``missing``, ``across an axle``) prefixed with its item's ``item_group`` name, as the line
    printed on a test certificate reads (``Position lamp missing``), and how many rows changed.
    Whole sentences (``Brake disc significantly and obviously worn``) are kept as they are."""
    items = [
        names.get((int(i), int(c)), "") if pd.notna(i) else ""
        for i, c in zip(detail["test_item_id"], detail["test_class_id"], strict=True)
    ]
    item = pd.Series(items, index=detail.index, dtype=object).str.strip()
    changed = pd.Series(False, index=detail.index)
    out = detail.copy()
    for col in ("rfr_desc", "rfr_advisory_text"):
        value = out[col].where(out[col].notna(), "").astype(str).str.strip()
        fragment = value.str.match(r"[a-z]") & item.ne("")
        out.loc[fragment, col] = item[fragment] + " " + value[fragment]
        changed |= fragment
    return out, int(changed.sum())


def _defect_text(location: str, desc: str, comment: str, ref: str) -> str:
    text = " ".join(p.strip() for p in (location, desc, comment) if p and p.strip())
    if ref and mot_labels.section_from_text(desc) is None:
        text = f"{text} ({ref.strip()})"
    return text


def with_detail(m: pd.DataFrame, detail: pd.DataFrame) -> pd.DataFrame:
    """Defect rows ``m`` joined with their ``item_detail`` row by (rfr_id, test_class_id); a class
    without its own row takes the rfr's row of its lowest class (one rule on both paths, whatever
    order the lookup table was read in)."""
    m = m.merge(detail, on=["rfr_id", "test_class_id"], how="left", sort=False)
    miss = m["rfr_desc"].isna() & m["rfr_id"].isin(detail["rfr_id"])
    if miss.any():
        by_rfr = detail.sort_values(["rfr_id", "test_class_id"], kind="stable").drop_duplicates("rfr_id")
        by_rfr = by_rfr.set_index("rfr_id")
        for c in ("test_item_id", "rfr_desc", "rfr_insp_manual_desc", "rfr_advisory_text", "rfr_deficiency_category"):
            m.loc[miss, c] = m.loc[miss, "rfr_id"].map(by_rfr[c])
    return m


def advisory_rows(m: pd.DataFrame) -> np.ndarray:
    """Where a defect row is an advisory (``rfr_type_code`` A): its text is the advisory text."""
    return mot_labels.normalised(m["rfr_type_code"], str.upper).eq("A").to_numpy()


def defect_groups(m: pd.DataFrame) -> np.ndarray:
    """Each defect row's ``split_group`` (training.dataset.split_groups): its defect (``rfr_id``) and
    whether it was an advisory (whose text differs), without location or tester comment, so the
    variants of one defect share it."""
    # distinct (rfr_id, advisory) pairs: from the rfr_id's factor code, not rfr_id * 2 (which overflowed
    # int64 from 2**62 on); label each once: rows repeat them
    codes, rfrs = pd.factorize(m["rfr_id"].to_numpy(dtype=np.int64))
    uniq, at = np.unique(codes.astype(np.int64) * 2 + advisory_rows(m), return_inverse=True)
    labels = np.array([f"rfr:{rfrs[c >> 1]}:{'advisory' if c & 1 else 'defect'}" for c in uniq.tolist()], dtype=object)
    return labels[at.reshape(-1)]


def label_defects(m: pd.DataFrame, post: pd.Series, lk: Lookups) -> tuple[np.ndarray, np.ndarray, pd.Series]:
    """Text, section (-1 = none) and severity (None = none) of defect rows joined with ``item_detail``.

    ``m`` needs rfr_id, test_class_id, test_item_id, location_id, rfr_comment, rfr_type_code,
    dangerous_mark and the item_detail columns; ``post`` marks tests on or after 20 May 2018.
    Texts are built once per distinct combination: they repeat massively.
    """
    key = pd.DataFrame(
        {
            "rfr_id": m["rfr_id"].to_numpy(),
            "test_class_id": m["test_class_id"].to_numpy(),
            "location_id": m["location_id"].to_numpy(),
            "comment_code": pd.factorize(m["rfr_comment"])[0],
            "advisory": advisory_rows(m),
            "post": np.asarray(post, dtype=bool),
        }
    )
    gid = key.groupby(list(key.columns), sort=False).ngroup().to_numpy()
    first = key.drop_duplicates().index.to_numpy()
    cols = ["rfr_desc", "rfr_advisory_text", "rfr_insp_manual_desc", "rfr_comment", "location_id", "test_item_id",
            "test_class_id"]  # fmt: skip
    uniq = m[cols].iloc[first].assign(advisory=key["advisory"].to_numpy()[first], post=key["post"].to_numpy()[first])
    texts: list[str] = []
    sections: list[int] = []
    for row in uniq.itertuples(index=False):
        desc = row.rfr_desc
        if row.advisory and isinstance(row.rfr_advisory_text, str) and row.rfr_advisory_text.strip():
            desc = row.rfr_advisory_text
        ref = row.rfr_insp_manual_desc if mot_labels.is_reference(row.rfr_insp_manual_desc) else ""
        comment = row.rfr_comment if isinstance(row.rfr_comment, str) else ""
        text = _defect_text(lk.locations.get(int(row.location_id), ""), desc, comment, ref)
        section = mot_labels.section_from_text(text) if row.post else None
        if section is None and pd.notna(row.test_item_id):
            root = lk.group_root.get((int(row.test_item_id), int(row.test_class_id)), "")
            section = mot_labels.section_from_group(root)
        texts.append(text)
        sections.append(-1 if section is None else section)
    severity = mot_labels.bulk_severity(m["rfr_type_code"], m["rfr_deficiency_category"], m["dangerous_mark"])
    return np.asarray(texts, dtype=object)[gid], np.asarray(sections, dtype=np.int8)[gid], severity
