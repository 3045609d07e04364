"""Seeded synthetic MOT data in the DVSA anonymised bulk-file format.

Writes ``test_result``, ``test_item``, ``item_detail``, ``item_group`` and the location lookup
``mdr_rfr_location`` (pipe- or comma-delimited, latin-1 encoded like the DVSA files, optionally one
zip per table). Content: every manual section and severity, locations ("Nearside Front"), manual
references ("1.1.14 (a) (ii)"), tester free text, Zipf-like repetition of the catalogue, realistic
makes, models, ages, mileage and fuel codes. Rows are generated and written in blocks, so memory is
constant from 1k to 10M+ rows; the same seed gives byte-identical files.

Format notes (docs/data.md): ``item_detail.rfr_insp_manual_desc`` holds the manual reference;
``test_item.rfr_comment`` (trailing, mostly empty) carries tester free text, which the real
anonymised tables omit; readers that look columns up by name ignore it.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm import tqdm

from motlens.atomic import atomic_write
from training.outdir import ForeignOutput, exclusive, refuse_foreign, written

BLOCK_TESTS = 100_000
_TABLE_NAMES = ("item_detail", "item_group", "mdr_rfr_location", "test_result", "test_item")
_ZIP_TIME = (2024, 1, 1, 0, 0, 0)
_STAGING = ".synth-"  # prefix of the hidden staging directory in out_dir
#: every name a table may have; a run writes the five of its delimiter and ``zipped``
_TABLE_FILES = frozenset(f"{name}{suffix}" for name in _TABLE_NAMES for suffix in (".txt", ".csv", ".zip"))
#: the tables a run wrote into out_dir, a JSON list (hidden: readers skip it); a run replaces only these
MARK = ".motlens-synth"
_EPOCH = dt.date(1970, 1, 1)
_FIRST_DAY = (dt.date(2018, 5, 21) - _EPOCH).days
_LAST_DAY = (dt.date(2024, 12, 31) - _EPOCH).days

TEST_RESULT_COLUMNS = (
    "test_id", "vehicle_id", "test_date", "test_class_id", "test_type", "test_result", "test_mileage",
    "postcode_area", "make", "model", "colour", "fuel_type", "cylinder_capacity", "first_use_date",
)  # fmt: skip
TEST_ITEM_COLUMNS = ("test_id", "rfr_id", "rfr_type_code", "location_id", "dangerous_mark", "rfr_comment")
ITEM_DETAIL_COLUMNS = (
    "rfr_id", "test_class_id", "test_item_id", "minor_item", "rfr_desc", "rfr_loc_marker",
    "rfr_insp_manual_desc", "rfr_advisory_text", "test_item_set_section_id", "rfr_deficiency_category",
)  # fmt: skip
ITEM_GROUP_COLUMNS = ("test_item_id", "test_class_id", "parent_id", "test_item_set_section_id", "item_name")
LOCATION_COLUMNS = ("location_id", "lateral", "longitudinal", "vertical")

# (manual reference, top-level group, item, [(defect text, category)], advisory text, has location)
# Group names follow the bulk lookup's own grouping, not the manual numbering (docs/data.md).
_CATALOGUE: list[tuple[str, str, str, list[tuple[str, str]], str, bool]] = [
    ("0.1 (a)", "Identification of the vehicle", "Registration plate",
     [("Registration plate missing or so insecure that it is likely to fall off", "Major")],
     "Registration plate deteriorated", False),
    ("0.1 (b)", "Identification of the vehicle", "Registration plate",
     [("Registration plate characters incorrectly formed or spaced", "Major")],
     "Registration plate characters fading", False),
    ("0.2 (a) (i)", "Identification of the vehicle", "Vehicle identification number",
     [("VIN missing", "Major")], "VIN partially obscured", False),
    ("0.2 (a) (ii)", "Identification of the vehicle", "Vehicle identification number",
     [("VIN incomplete, illegible or obviously falsified", "Major")], "VIN difficult to read", False),
    ("1.1.13 (a) (ii)", "Brakes", "Brake pads",
     [("Brake pad(s) less than 1.5 mm thick", "Major"), ("Brake pad(s) wearing indicator showing", "Minor")],
     "Brake pad(s) wearing thin", True),
    ("1.1.14 (a) (ii)", "Brakes", "Brake discs",
     [("Brake disc significantly and obviously worn", "Major"),
      ("Brake disc seriously weakened", "Dangerous")],
     "Brake disc worn, pitted or scored, but not seriously weakened", True),
    ("1.1.11 (c)", "Brakes", "Brake pipes",
     [("Brake pipe excessively corroded", "Major"),
      ("Brake pipe corroded to the extent that there is a risk of failure", "Dangerous")],
     "Brake pipe slightly corroded", True),
    ("1.1.12 (c)", "Brakes", "Brake hoses",
     [("Brake hose damaged or chafing", "Major")], "Brake hose slightly chafed", True),
    ("1.2.1 (b) (i)", "Brakes", "Service brake performance",
     [("Brake effort not recorded from a wheel", "Major"),
      ("Service brake efficiency below requirements", "Major")],
     "Brakes imbalanced across an axle", True),
    ("1.4.2 (a)", "Brakes", "Parking brake performance",
     [("Parking brake efficiency below requirements", "Major"),
      ("Parking brake efficiency less than 50% of the required value", "Dangerous")],
     "Parking brake lever has excessive travel", False),
    ("1.6 (a)", "Brakes", "Anti-lock braking system",
     [("ABS warning device shows system malfunction", "Major")], "ABS warning lamp flickering", False),
    ("2.1.3 (b)", "Steering", "Steering box",
     [("Steering gear leaking oil", "Minor"), ("Steering gear casing fractured", "Dangerous")],
     "Steering rack gaiter deteriorated", True),
    ("2.2.1 (c)", "Steering", "Steering linkage",
     [("Steering rack gaiter split", "Minor"), ("Steering rack gaiter missing", "Major")],
     "Steering rack gaiter perished", True),
    ("2.2.2 (a)", "Steering", "Track rod end",
     [("Track rod end ball joint has excessive play", "Major"),
      ("Track rod end ball joint excessively worn, serious risk of detachment", "Dangerous")],
     "Track rod end ball joint has slight play", True),
    ("2.6 (b)", "Steering", "Electronic power steering",
     [("Electronic power steering malfunction indicator lamp illuminated", "Major")],
     "Power steering fluid level low", False),
    ("3.2 (a) (i)", "Visibility", "Windscreen",
     [("Windscreen damaged in zone A, more than 10 mm", "Major"),
      ("Windscreen crack outside zone A, more than 40 mm", "Major")],
     "Windscreen chipped in zone A, but not adversely affecting the drivers view", False),
    ("3.3 (a)", "Visibility", "Mirrors",
     [("Mirror missing", "Major"), ("Mirror damaged", "Minor")], "Mirror glass slightly damaged", True),
    ("3.4 (b)", "Visibility", "Wipers",
     [("Wiper blade missing", "Major"), ("Wiper blade deteriorated", "Minor")],
     "Wiper blade starting to deteriorate", True),
    ("3.5 (a)", "Visibility", "Washers",
     [("Windscreen washer provides insufficient washer liquid", "Minor")],
     "Washer fluid level low", False),
    ("4.1.1 (a) (ii)", "Lamps, reflectors and electrical equipment", "Headlamps",
     [("Headlamp not working", "Major"), ("Headlamp lens defective", "Minor")],
     "Headlamp lens slightly damaged", True),
    ("4.1.2 (a)", "Lamps, reflectors and electrical equipment", "Headlamp aim",
     [("Headlamp aim too high", "Major"), ("Headlamp aim too low", "Major")],
     "Headlamp aim slightly high", True),
    ("4.3.1 (a) (ii)", "Lamps, reflectors and electrical equipment", "Stop lamps",
     [("Stop lamp not working", "Major"), ("Stop lamp(s) all inoperative", "Dangerous")],
     "Stop lamp lens slightly cracked", True),
    ("4.4.1 (a)", "Lamps, reflectors and electrical equipment", "Direction indicators",
     [("Direction indicator not working", "Major"), ("Direction indicator flashing rate incorrect", "Minor")],
     "Direction indicator lens cracked", True),
    ("4.2.1 (a) (ii)", "Lamps, reflectors and electrical equipment", "Position lamps",
     [("Position lamp not working", "Minor")], "Position lamp lens discoloured", True),
    ("4.7.1 (b) (i)", "Lamps, reflectors and electrical equipment", "Registration plate lamp",
     [("Rear registration plate lamp inoperative", "Minor")], "Registration plate lamp flickering", True),
    ("4.11.1 (a)", "Lamps, reflectors and electrical equipment", "Electrical wiring",
     [("Electrical wiring insecure", "Minor"),
      ("Electrical wiring insulation damaged, likely to short", "Major")],
     "Electrical wiring slightly chafed", False),
    ("5.2.3 (e)", "Tyres", "Tread depth",
     [("Tyre tread depth below requirements of 1.6mm", "Major"),
      ("Tyre tread depth below requirements with cords exposed", "Dangerous")],
     "Tyre worn close to legal limit", True),
    ("5.2.3 (d) (i)", "Tyres", "Tyre condition",
     [("Tyre has a cut in excess of the requirements", "Major"),
      ("Tyre has a lump, bulge or tear caused by separation or partial failure of its structure",
       "Dangerous")],
     "Tyre slightly damaged/cracking or perishing", True),
    ("5.2.3 (a)", "Tyres", "Tyre pressure",
     [("Tyre pressure monitoring system malfunction indicator lamp illuminated", "Minor")],
     "Tyre under inflated", True),
    ("5.2.2 (a)", "Road Wheels", "Wheels",
     [("Wheel fixing nut missing", "Major"), ("Road wheel seriously damaged", "Dangerous")],
     "Wheel trim damaged", True),
    ("5.3.1 (b) (i)", "Suspension", "Springs",
     [("Coil spring fractured or seriously weakened", "Major"),
      ("Coil spring fractured and likely to affect directional stability", "Dangerous")],
     "Coil spring corroded", True),
    ("5.3.2 (b)", "Suspension", "Shock absorbers",
     [("Shock absorber damaged", "Major"), ("Shock absorber leaking", "Minor")],
     "Shock absorber misting", True),
    ("5.3.4 (a) (i)", "Suspension", "Suspension joints",
     [("Suspension ball joint excessively worn", "Major"),
      ("Suspension arm ball joint dust cover missing", "Minor")],
     "Suspension arm ball joint dust cover deteriorated", True),
    ("5.3.4 (b) (ii)", "Suspension", "Suspension pins and bushes",
     [("Anti-roll bar linkage ball joint excessively worn", "Major")],
     "Anti-roll bar linkage ball joint has slight play", True),
    ("5.1.3 (a)", "Suspension", "Wheel bearings",
     [("Wheel bearing excessively rough", "Major"), ("Wheel bearing has excessive play", "Major")],
     "Wheel bearing slightly rough", True),
    ("6.1.1 (c)", "Body, chassis, structure", "Structure",
     [("Vehicle structure excessively corroded, seriously affecting its strength within 30 cm of the "
       "body mountings", "Major"),
      ("Sill excessively corroded, seriously weakened", "Dangerous")],
     "Corrosion to underside, but not seriously weakened", True),
    ("6.1.2 (a)", "Body, chassis, structure", "Exhaust system",
     [("Exhaust has a major leak of exhaust gases", "Major"), ("Exhaust insecure", "Minor")],
     "Exhaust corroded", False),
    ("6.2.3 (a)", "Body, chassis, structure", "Doors",
     [("Door will not open using the relevant control", "Major"), ("Door hinge deteriorated", "Minor")],
     "Door does not latch securely at first attempt", True),
    ("6.1.7 (a)", "Body, chassis, structure", "Fuel system",
     [("Fuel pipe leaking", "Major"), ("Fuel leaking, presenting a fire risk", "Dangerous")],
     "Fuel pipe corroded, covered in grease", False),
    ("6.2.1 (b)", "Body, chassis, structure", "Bodywork",
     [("Body panel sharp edge likely to cause injury", "Major")], "Body panel damaged", True),
    ("7.1.1 (a)", "Seat belts and supplementary restraint systems", "Seat belts",
     [("Seat belt missing", "Major"), ("Seat belt anchorage insecure", "Dangerous")],
     "Seat belt webbing slightly frayed", True),
    ("7.1.2 (b)", "Seat belts and supplementary restraint systems", "Seat belt condition",
     [("Seat belt buckle does not secure", "Major"), ("Seat belt retractor does not retract", "Minor")],
     "Seat belt retractor slow to retract", True),
    ("7.1.6 (a)", "Seat belts and supplementary restraint systems", "Airbags",
     [("Airbag malfunction indicator shows a failure", "Major")], "SRS warning lamp intermittent", False),
    ("7.2 (a)", "Body, chassis, structure", "Seats",
     [("Seat insecure", "Major")], "Seat back recliner stiff", True),
    ("7.5 (a)", "Lamps, reflectors and electrical equipment", "Horn",
     [("Horn not working", "Major"), ("Horn control insecure", "Minor")], "Horn sound weak", False),
    ("7.10 (a)", "Body, chassis, structure", "Speedometer",
     [("Speedometer not working", "Minor")], "Speedometer illumination inoperative", False),
    ("8.1.1 (a)", "Noise, emissions and leaks", "Noise",
     [("Exhaust noise levels in excess of those permitted", "Major")], "Exhaust slightly noisy", False),
    ("8.2.1.2 (a)", "Noise, emissions and leaks", "Spark ignition emissions",
     [("Exhaust emissions exceed manufacturer's specified limits", "Major"),
      ("Exhaust emits visible smoke", "Major")],
     "Engine malfunction indicator lamp illuminated intermittently", False),
    ("8.2.2.2 (a)", "Noise, emissions and leaks", "Diesel emissions",
     [("Diesel particulate filter has been removed", "Major"),
      ("Exhaust smoke opacity exceeds the limit", "Major")],
     "Exhaust smoke opacity close to limit", False),
    ("8.4.1 (a)", "Noise, emissions and leaks", "Fluid leaks",
     [("Engine has an oil leak, excessive", "Major"),
      ("Fluid leaking excessively presenting a fire risk", "Dangerous"),
      ("Oil leak, but not excessive", "Minor")],
     "Oil leak, slight", True),
]  # fmt: skip

_LOCATIONS: list[tuple[str, str, str]] = [
    (lat, lon, vert)
    for lat in ("Nearside", "Offside", "Central")
    for lon in ("Front", "Rear", "")
    for vert in ("", "Inner", "Outer", "Upper", "Lower")
]

_COMMENTS = (
    "both sides", "slight", "recommend replacement", "customer advised", "nsf worse than osf",
    "tread at 1.8mm", "pressure 20psi", "quote £85 given", "noted at 90° to wheel", "advised to monitor",
    "under tray", "not fully inspected, trim fitted", "rear most", "at bulkhead", "inner edge",
)  # fmt: skip

# (make, [(model, weight)], weight); DVSA spells makes upper case.
_MAKES: list[tuple[str, list[str], float]] = [
    ("FORD", ["FIESTA", "FOCUS", "KUGA", "MONDEO", "TRANSIT CONNECT", "PUMA"], 14.0),
    ("VAUXHALL", ["CORSA", "ASTRA", "INSIGNIA", "MOKKA", "ZAFIRA"], 11.0),
    ("VOLKSWAGEN", ["GOLF", "POLO", "PASSAT", "TIGUAN", "UP"], 10.0),
    ("BMW", ["1 SERIES", "3 SERIES", "5 SERIES", "X1", "X3"], 6.0),
    ("MERCEDES-BENZ", ["A CLASS", "C CLASS", "E CLASS", "SPRINTER"], 5.5),
    ("AUDI", ["A3", "A4", "A1", "Q5"], 5.5),
    ("TOYOTA", ["YARIS", "AYGO", "COROLLA", "PRIUS", "RAV4"], 6.0),
    ("NISSAN", ["QASHQAI", "MICRA", "JUKE", "NOTE", "LEAF"], 5.0),
    ("PEUGEOT", ["208", "308", "2008", "3008", "207"], 4.5),
    ("RENAULT", ["CLIO", "MEGANE", "CAPTUR", "KANGOO"], 3.5),
    ("CITROEN", ["C1", "C3", "C4", "BERLINGO"], 3.5),
    ("HONDA", ["CIVIC", "JAZZ", "CR-V"], 3.0),
    ("KIA", ["SPORTAGE", "PICANTO", "CEED", "NIRO"], 3.5),
    ("HYUNDAI", ["I10", "I20", "I30", "TUCSON", "KONA"], 3.0),
    ("SKODA", ["OCTAVIA", "FABIA", "SUPERB", "KODIAQ"], 3.0),
    ("MINI", ["MINI COOPER", "MINI ONE", "COUNTRYMAN"], 2.5),
    ("FIAT", ["500", "PUNTO", "PANDA"], 2.5),
    ("SEAT", ["IBIZA", "LEON", "ATECA"], 2.0),
    ("LAND ROVER", ["RANGE ROVER EVOQUE", "DISCOVERY SPORT", "DEFENDER"], 1.8),
    ("VOLVO", ["XC60", "XC90", "V40"], 1.5),
    ("MAZDA", ["MAZDA2", "MAZDA3", "CX-5", "MX-5"], 1.5),
    ("SUZUKI", ["SWIFT", "VITARA"], 1.2),
    ("TESLA", ["MODEL 3", "MODEL Y"], 0.5),
]  # fmt: skip
_FUELS = (("PE", 0.55), ("DI", 0.38), ("HY", 0.04), ("EL", 0.02), ("LP", 0.005), ("OT", 0.005))
_COLOURS = ("SILVER", "BLACK", "BLUE", "GREY", "WHITE", "RED", "GREEN", "YELLOW", "BROWN", "ORANGE")
_POSTCODES = ("B", "BS", "CF", "E", "G", "L", "LS", "M", "N", "NE", "NG", "S", "SE", "SW", "TN", "W")
_CLASSES = (4, 7)


@dataclass(frozen=True)
class Catalogue:
    """The item_detail / item_group / location lookups the generator samples from."""

    rfr_ids: np.ndarray
    categories: np.ndarray  # "Minor" / "Major" / "Dangerous"
    has_location: np.ndarray
    item_detail: pa.Table
    item_group: pa.Table
    locations: pa.Table


def build_catalogue() -> Catalogue:
    """The fixed catalogue (independent of the seed, like DVSA's lookup tables)."""
    groups: dict[str, int] = {}
    items: dict[tuple[str, str], int] = {}
    group_rows: list[tuple[int, int, int, int, str]] = []
    detail_rows: list[tuple] = []
    rfr_ids, cats, locs = [], [], []
    next_item = 1
    rfr = 1000
    for ref, group, item, defects, advisory, has_loc in _CATALOGUE:
        section = int(ref.split(".")[0])
        if group not in groups:
            groups[group] = next_item
            next_item += 1
            for cls in _CLASSES:
                group_rows.append((groups[group], cls, 0, len(groups), group))
        if (group, item) not in items:
            items[(group, item)] = next_item
            next_item += 1
            for cls in _CLASSES:
                group_rows.append((items[(group, item)], cls, groups[group], section, item))
        for text, cat in defects:
            rfr += 1 + (rfr % 7)
            for cls in _CLASSES:
                detail_rows.append(
                    (rfr, cls, items[(group, item)], "Y" if cat == "Minor" else "N", text,
                     "Y" if has_loc else "N", ref, advisory, section, cat)
                )  # fmt: skip
            rfr_ids.append(rfr)
            cats.append(cat)
            locs.append(has_loc)
    detail = pa.table({c: list(v) for c, v in zip(ITEM_DETAIL_COLUMNS, zip(*detail_rows, strict=False), strict=True)})
    group_tbl = pa.table({c: list(v) for c, v in zip(ITEM_GROUP_COLUMNS, zip(*group_rows, strict=False), strict=True)})
    loc_cols = list(zip(*_LOCATIONS, strict=False))
    locations = pa.table(
        {
            "location_id": list(range(1, len(_LOCATIONS) + 1)),
            "lateral": list(loc_cols[0]),
            "longitudinal": list(loc_cols[1]),
            "vertical": list(loc_cols[2]),
        }
    )
    return Catalogue(np.array(rfr_ids), np.array(cats), np.array(locs), detail, group_tbl, locations)


class _TableWriter:
    """One output table: a plain file or a single-member zip, written block by block in latin-1."""

    def __init__(self, out_dir: Path, name: str, columns: tuple[str, ...], delimiter: str, zipped: bool):
        self.delimiter = delimiter
        self.member = f"{name}.{'txt' if delimiter == '|' else 'csv'}"
        self._zip: zipfile.ZipFile | None = None
        if zipped:
            self.path = out_dir / f"{name}.zip"
            self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6)
            info = zipfile.ZipInfo(self.member, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            self._fh: io.BufferedIOBase = self._zip.open(info, "w", force_zip64=True)  # type: ignore[assignment]
        else:
            self.path = out_dir / self.member
            self._fh = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write((delimiter.join(columns) + "\n").encode("latin-1"))
        self._options = pacsv.WriteOptions(
            include_header=False, delimiter=delimiter, quoting_style="none" if delimiter == "|" else "needed"
        )

    def write(self, table: pa.Table) -> None:
        buf = pa.BufferOutputStream()
        pacsv.write_csv(table, buf, self._options)
        data = buf.getvalue().to_pybytes()
        if not data.isascii():
            data = data.decode("utf-8").encode("latin-1", errors="replace")
        self._fh.write(data)

    def close(self) -> None:
        self._fh.close()
        if self._zip is not None:
            self._zip.close()


def _weights(n: int, s: float = 1.1, uniform: float = 0.1) -> np.ndarray:
    """Zipf-like rank weights mixed with a uniform floor so every entry appears."""
    z = 1.0 / np.arange(1, n + 1) ** s
    w = (1 - uniform) * z / z.sum() + uniform / n
    return w / w.sum()


def _date_strings(days: np.ndarray) -> pa.Array:
    return pa.array(days.astype("int32"), type=pa.int32()).cast(pa.date32())


def generate(out_dir: Path, rows: int, seed: int, delimiter: str = "|", zipped: bool = False) -> dict:
    """Write the DVSA tables with ``rows`` test_item (defect) rows under ``out_dir``; returns counts.

    The tables are written into a hidden staging directory inside ``out_dir`` and moved into place only
    once all are complete: a run that fails or is interrupted leaves ``out_dir`` as it was (never a
    truncated dataset that reads as a smaller one), and a rerun never mixes two formats. One run at a
    time per ``out_dir`` (:class:`training.outdir.OutputBusy` otherwise); it first removes the staging
    directories that killed runs left (readers skip hidden directories meanwhile). A non-empty
    ``out_dir`` that no run wrote (no :data:`MARK`), or a table file there that its mark does not list, is
    refused before any work (:class:`training.outdir.ForeignOutput`): a run replaces only what runs wrote.
    """
    if delimiter in ("pipe", "comma"):
        delimiter = "|" if delimiter == "pipe" else ","
    if delimiter not in ("|", ","):
        raise ValueError(f"delimiter must be '|' or ',', not {delimiter!r}")
    if rows < 0:
        raise ValueError("rows must be >= 0")
    out_dir = Path(out_dir)
    suffix = ".zip" if zipped else ".txt" if delimiter == "|" else ".csv"
    tables = {f"{name}{suffix}" for name in _TABLE_NAMES}
    _earlier(out_dir, tables)  # refused before anything in out_dir is touched
    with exclusive(out_dir, f"{_STAGING}*"):
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=out_dir))  # out_dir's filesystem, its permissions
        try:
            counts = _write_tables(staging, rows, seed, delimiter, zipped)
            earlier = _earlier(out_dir, tables)  # read again holding the lock: a run may have ended meanwhile
            atomic_write(out_dir / MARK, json.dumps(sorted(earlier | tables)))  # so a killed run's are known
            for name in earlier - tables:  # an earlier run in another format must not mix in
                (out_dir / name).unlink(missing_ok=True)
            for name in _TABLE_NAMES:  # the lookups first, test_item last
                for new in staging.glob(f"{name}.*"):
                    new.replace(out_dir / new.name)  # same filesystem: a rename
            atomic_write(out_dir / MARK, json.dumps(sorted(tables)))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    counts["files"] = sorted(p.name for p in out_dir.iterdir() if p.stem.split(".")[0] in _TABLE_NAMES)
    return counts


def _earlier(out_dir: Path, tables: set[str]) -> set[str]:
    """The tables earlier runs wrote into ``out_dir``, which this run (writing ``tables``) replaces.

    Raises :class:`ForeignOutput` for a non-empty ``out_dir`` without :data:`MARK` (unless it holds just
    the tables of a run from before marks) or holding one of ``tables`` that its mark does not list.
    """
    if (out_dir / MARK).exists():
        earlier = written(out_dir / MARK) & _TABLE_FILES
    elif not (earlier := _unmarked_run(out_dir)):
        refuse_foreign(out_dir, (MARK,), "the output of motlens data synth")
    if clash := sorted(name for name in tables - earlier if (out_dir / name).exists()):
        raise ForeignOutput(
            f"{out_dir} holds {clash[0]}, which motlens data synth did not write: refused rather than "
            "overwritten; give an empty or new directory"
        )
    return earlier


def _unmarked_run(out_dir: Path) -> set[str]:
    """The tables in ``out_dir`` when they are all it holds and a run wrote them before :data:`MARK`
    existed: one ``test_item`` with this generator's header (``rfr_comment`` is in no DVSA file); else none."""
    names = {p.name for p in out_dir.iterdir() if not p.name.startswith(".")} if out_dir.is_dir() else set()
    items = [out_dir / name for name in names if name.startswith("test_item.")]
    if not names <= _TABLE_FILES or len(items) != 1:
        return set()
    try:
        if items[0].suffix == ".zip":
            with zipfile.ZipFile(items[0]) as zf, zf.open(zf.namelist()[0]) as fh:
                head = fh.readline(4096)
        else:
            with items[0].open("rb") as fh:
                head = fh.readline(4096)
    except (OSError, zipfile.BadZipFile, IndexError):
        return set()
    return names if head.rstrip(b"\r\n").decode("latin-1") in {d.join(TEST_ITEM_COLUMNS) for d in "|,"} else set()


def _write_tables(out_dir: Path, rows: int, seed: int, delimiter: str, zipped: bool) -> dict:
    """Every table under ``out_dir`` (see :func:`generate`); the counts, without ``files``."""
    cat = build_catalogue()
    rng = np.random.default_rng(seed)

    # Zipf over a seeded ordering of the catalogue; some defects are far more common than others.
    order = rng.permutation(len(cat.rfr_ids))
    rfr_w = np.empty(len(order))
    rfr_w[order] = _weights(len(order))
    make_w = np.array([m[2] for m in _MAKES])
    make_w /= make_w.sum()
    fuel_codes = np.array([f for f, _ in _FUELS])
    fuel_w = np.array([w for _, w in _FUELS])
    fuel_w /= fuel_w.sum()
    comments = np.array(_COMMENTS)

    for name, cols, table in (
        ("item_detail", ITEM_DETAIL_COLUMNS, cat.item_detail),
        ("item_group", ITEM_GROUP_COLUMNS, cat.item_group),
        ("mdr_rfr_location", LOCATION_COLUMNS, cat.locations),
    ):
        w = _TableWriter(out_dir, name, cols, delimiter, zipped)
        w.write(table)
        w.close()

    results = _TableWriter(out_dir, "test_result", TEST_RESULT_COLUMNS, delimiter, zipped)
    items = _TableWriter(out_dir, "test_item", TEST_ITEM_COLUMNS, delimiter, zipped)
    n_items = n_tests = 0
    next_test_id = 10_000_000 + int(rng.integers(0, 1_000_000))
    sev_counts: dict[str, int] = {}
    try:
        with tqdm(total=rows, unit="row", desc="synth test_item", disable=rows < 200_000) as bar:
            bar.leave = False  # an interrupted run clears its bar: a stopped count must not read as a result
            while n_items < rows:
                n = BLOCK_TESTS
                counts = np.where(rng.random(n) < 0.35, 0, rng.geometric(0.4, n))
                cum = np.cumsum(counts)
                need = rows - n_items
                if cum[-1] >= need:
                    n = int(np.searchsorted(cum, need)) + 1
                    counts = counts[:n].copy()
                    counts[-1] -= int(cum[n - 1] - need)
                test_ids = next_test_id + np.cumsum(rng.integers(1, 40, n))
                next_test_id = int(test_ids[-1])
                k = int(counts.sum())
                tr, ti, sev = _block(rng, cat, test_ids, counts, k, rfr_w, make_w, fuel_codes, fuel_w, comments)
                results.write(tr)
                items.write(ti)
                for s, c in zip(*np.unique(sev, return_counts=True), strict=True):
                    sev_counts[str(s)] = sev_counts.get(str(s), 0) + int(c)
                n_items += k
                n_tests += n
                bar.update(k)
            bar.leave = True  # complete: the final count stays on screen
    finally:
        results.close()
        items.close()
    return {
        "test_item": n_items,
        "test_result": n_tests,
        "item_detail": cat.item_detail.num_rows,
        "item_group": cat.item_group.num_rows,
        "mdr_rfr_location": cat.locations.num_rows,
        "type_codes": dict(sorted(sev_counts.items())),
    }


def _block(rng, cat, test_ids, counts, k, rfr_w, make_w, fuel_codes, fuel_w, comments):
    """One block: ``len(test_ids)`` tests and their ``k`` defect rows as Arrow tables."""
    n = len(test_ids)
    # Defects first: the test result follows from them.
    idx = rng.choice(len(cat.rfr_ids), size=k, p=rfr_w)
    item_test = np.repeat(test_ids, counts)
    # A test records a defect once: move repeats within a test to another catalogue entry.
    for _ in range(20):
        dup = pd.DataFrame({"t": item_test, "i": idx}).duplicated().to_numpy()
        if not dup.any():
            break
        idx[dup] = (idx[dup] + rng.integers(1, len(cat.rfr_ids), int(dup.sum()))) % len(cat.rfr_ids)
    category = cat.categories[idx]
    advisory = rng.random(k) < 0.42
    prs = rng.random(k) < 0.08
    type_code = np.where(advisory, "A", np.where(category == "Minor", "M", np.where(prs, "P", "F"))).astype(object)
    dmark = np.where((type_code != "A") & (category == "Dangerous"), "D", "")
    loc = np.where(cat.has_location[idx], rng.integers(1, len(_LOCATIONS) + 1, k), 0)
    comment = np.where(rng.random(k) < 0.07, comments[rng.integers(0, len(comments), k)], "")
    failing = np.isin(type_code, ["F", "P"])
    fails_per_test = np.bincount(np.repeat(np.arange(n), counts), weights=failing, minlength=n)
    prs_per_test = np.bincount(np.repeat(np.arange(n), counts), weights=type_code == "P", minlength=n)
    abandoned = rng.random(n) < 0.003
    result = np.where(
        abandoned, np.where(rng.random(n) < 0.5, "ABA", "ABR"),
        np.where(fails_per_test == 0, "P", np.where(prs_per_test == fails_per_test, "PRS", "F")),
    )  # fmt: skip
    items = pa.table(
        {
            "test_id": item_test,
            "rfr_id": cat.rfr_ids[idx],
            "rfr_type_code": type_code.astype(str),
            "location_id": loc,
            "dangerous_mark": dmark,
            "rfr_comment": comment,
        }
    )
    # Vehicles: make/model, age, mileage, fuel.
    make_i = rng.choice(len(_MAKES), size=n, p=make_w)
    model = np.array(
        [_MAKES[m][1][j % len(_MAKES[m][1])] for m, j in zip(make_i, rng.integers(0, 60, n), strict=False)]
    )
    make = np.array([_MAKES[m][0] for m in make_i])
    fuel = fuel_codes[rng.choice(len(fuel_codes), size=n, p=fuel_w)]
    fuel = np.where(make == "TESLA", "EL", fuel)
    test_day = rng.integers(_FIRST_DAY, _LAST_DAY + 1, n)
    age_years = 3 + rng.gamma(2.0, 3.2, n)
    first_use = test_day - (age_years * 365.25).astype(int)
    mileage = np.maximum(age_years * rng.normal(7800, 2600, n), 100 + rng.integers(0, 5000, n)).astype(int)
    mileage_arr = pa.array(mileage, mask=rng.random(n) < 0.01)
    cc = np.where(fuel == "EL", 0, rng.choice([998, 1198, 1397, 1598, 1968, 1995, 2993], size=n))
    results = pa.table(
        {
            "test_id": test_ids,
            "vehicle_id": rng.integers(1, 2**31 - 1, n),
            "test_date": _date_strings(test_day),
            "test_class_id": np.where(rng.random(n) < 0.04, 7, 4),
            "test_type": np.where(rng.random(n) < 0.12, "RT", "NT"),
            "test_result": result,
            "test_mileage": mileage_arr,
            "postcode_area": np.array(_POSTCODES)[rng.integers(0, len(_POSTCODES), n)],
            "make": make,
            "model": model,
            "colour": np.array(_COLOURS)[rng.integers(0, len(_COLOURS), n)],
            "fuel_type": fuel,
            "cylinder_capacity": cc,
            "first_use_date": _date_strings(first_use),
        }
    )
    return results, items, type_code.astype(str)
