"""The bad-input catalogue: every kind of bad input gets a message naming the file, the
line and the field, odd-but-valid images are converted rather than refused, and a bad
manifest never costs finished work."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svdbatch import run
from svdbatch.commands import validate
from svdbatch.core.errors import ConfigError, ManifestError
from svdbatch.core.params import Preprocess
from svdbatch.inputs.images import ImageProblem, check_image, load_rgb
from svdbatch.inputs.manifest import read_manifest
from tests.conftest import FAST, make_cfg, make_image, run_cli, write_csv

from .runfiles import failures_of, sidecar_file, video_file

TOO_LONG = "東" * 70  # 70 characters, 210 bytes in UTF-8


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height but has no pixel data: a decompression bomb's header,
    in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    """tmp/data/{img/a.png, img/b.png, broken images} and tmp/outside.png next to it."""
    root = tmp_path / "data"
    img = root / "img"
    make_image(img / "a.png", seed=1)
    make_image(img / "b.png", seed=2)
    (img / "fake.png").write_text("this is not a png")
    (img / "empty.png").write_bytes(b"")
    (img / "cut.png").write_bytes((img / "a.png").read_bytes()[:-200])
    (img / "folder.png").mkdir()
    make_image(img / "big.png", size=(120, 100))
    make_image(root / ".hidden.png")
    make_image(tmp_path / "outside.png")
    return root


def problems_of(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as info:
        read_manifest(path, **kwargs)
    return [str(p) for p in info.value.problems]


GOOD = "ok,img/b.png"  # line 2 of most cases: the bad row is on line 3
GOOD_JSON = '{"id": "ok", "image": "img/b.png"}'
# The config side of min/max guidance, as the driver passes it (a row may override one).
CONFIG_GUIDANCE = {"config_params": {"min_guidance_scale": 1.0, "max_guidance_scale": 3.0}}
SURROGATE = "not valid Unicode text (a lone surrogate"
HUGE_CELL = 16 * 2**20 + 1  # one character over the CSV cell limit

# name, file name, content, line (None: the whole file), field (None: none applies), fragment, read_manifest kwargs
CATALOGUE = [
    ("empty file", "m.csv", "", None, None, "manifest has no rows", {}),
    ("header only", "m.csv", "id,image\n", None, None, "manifest has no rows", {}),
    ("semicolon delimiter", "m.csv", "id;image\na;img/a.png\n", 1, "id;image", "is the file comma-separated?", {}),
    ("tab delimiter", "m.csv", "id\timage\na\timg/a.png\n", 1, "id\timage", "is the file comma-separated?", {}),
    ("missing image column", "m.csv", "id,seed\na,1\n", 1, "image", "required column is missing", {}),
    ("misspelt column", "m.csv", "id,image,Seed\na,img/a.png,1\n", 1, "Seed", "did you mean 'seed'?", {}),
    ("unnamed column", "m.csv", "id,image,\na,img/a.png,\n", 1, None, "column 3 has no name", {}),
    ("duplicate column", "m.csv", "id,image,id\na,img/a.png,b\n", 1, "id", "column appears twice", {}),
    ("ragged row", "m.csv", f"id,image\n{GOOD}\na,img/a.png,extra\n", 3, None, "row has 3 fields but the header has 2", {}),
    ("unclosed quote", "m.csv", f'id,image\n{GOOD}\n"a,img/a.png\nb,img/b.png\n', 3, None, "not valid CSV from this line on", {}),
    ("not UTF-8", "m.csv", "id,image\nok,img/b.png\ncaf\xe9,img/a.png\n".encode("latin-1"), 3, None, "not UTF-8 text", {}),
    ("UTF-16", "m.csv", "id,image\na,img/a.png\n".encode("utf-16"), None, None, "is UTF-16 text; save it as UTF-8", {}),
    ("duplicate id", "m.csv", f"id,image\n{GOOD}\nok,img/a.png\n", 3, "id", "duplicate id 'ok' (first used on line 2)", {}),
    ("seed not an integer", "m.csv", f"id,image,seed\n{GOOD},1\na,img/a.png,1.5\n", 3, "seed", "got '1.5'", {}),
    ("seed negative", "m.csv", f"id,image,seed\n{GOOD},1\na,img/a.png,-1\n", 3, "seed", "[0, 2**64), got -1", {}),
    ("seed 2**64", "m.csv", f"id,image,seed\n{GOOD},1\na,img/a.png,{2**64}\n", 3, "seed", f"got {2**64}", {}),
    ("seed in other digits", "m.csv", f"id,image,seed\n{GOOD},1\na,img/a.png,٣\n", 3, "seed", "got '٣'", {}),
    (
        "nan",
        "m.csv",
        f"id,image,noise_aug_strength\n{GOOD},\na,img/a.png,nan\n",
        3,
        "noise_aug_strength",
        "not a finite number",
        {},
    ),
    (
        "inf",
        "m.csv",
        f"id,image,max_guidance_scale\n{GOOD},\na,img/a.png,inf\n",
        3,
        "max_guidance_scale",
        "not a finite number",
        {},
    ),
    (
        "motion bucket 256",
        "m.csv",
        f"id,image,motion_bucket_id\n{GOOD},\na,img/a.png,256\n",
        3,
        "motion_bucket_id",
        "in [0, 255], got '256'",
        {},
    ),
    ("width not /8", "m.csv", f"id,image,width\n{GOOD},\na,img/a.png,100\n", 3, "width", "multiple of 8, got '100'", {}),
    ("height not /8", "m.csv", f"id,image,height\n{GOOD},\na,img/a.png,60\n", 3, "height", "multiple of 8, got '60'", {}),
    ("num_frames 1", "m.csv", f"id,image,num_frames\n{GOOD},\na,img/a.png,1\n", 3, "num_frames", "in [2, 1024], got '1'", {}),
    ("underscore number", "m.csv", f"id,image,fps\n{GOOD},\na,img/a.png,1_0\n", 3, "fps", "got '1_0'", {}),
    ("image missing", "m.csv", f"id,image\n{GOOD}\na,img/none.png\n", 3, "image", "image file not found (img/none.png)", {}),
    ("image truncated", "m.csv", f"id,image\n{GOOD}\na,img/cut.png\n", 3, "image", "not a readable image", {}),
    (
        "image not an image",
        "m.csv",
        f"id,image\n{GOOD}\na,img/fake.png\n",
        3,
        "image",
        "not a readable image: not an image format",
        {},
    ),
    (
        "image empty file",
        "m.csv",
        f"id,image\n{GOOD}\na,img/empty.png\n",
        3,
        "image",
        "not a readable image: the file is empty",
        {},
    ),
    ("image is a folder", "m.csv", f"id,image\n{GOOD}\na,img/folder.png\n", 3, "image", "is a folder, not an image file", {}),
    (
        "image too big",
        "m.csv",
        f"id,image\n{GOOD}\na,img/big.png\n",
        3,
        "image",
        "image is 120x100 = 12,000 pixels, more than run.max_image_pixels (6,000)",
        {"max_image_pixels": 6000},
    ),
    (
        "path traversal",
        "m.csv",
        f"id,image\n{GOOD}\na,../../x.png\n",
        3,
        "image",
        "resolves outside run.image_root",
        {"image_root": "$ROOT"},
    ),
    (
        "absolute path outside",
        "m.csv",
        f"id,image\n{GOOD}\na,$OUTSIDE\n",
        3,
        "image",
        "resolves outside run.image_root",
        {"image_root": "$ROOT"},
    ),
    ("id with /", "m.csv", f"id,image\n{GOOD}\nx/../../y,img/a.png\n", 3, "id", "must not contain path separators", {}),
    ("id with backslash", "m.csv", f"id,image\n{GOOD}\n..\\y,img/a.png\n", 3, "id", "must not start with '.'", {}),
    ("id with backslash inside", "m.csv", f"id,image\n{GOOD}\nx\\y,img/a.png\n", 3, "id", "must not contain path separators", {}),
    ("id ..", "m.csv", f"id,image\n{GOOD}\n..,img/a.png\n", 3, "id", "must not start with '.'", {}),
    ("id hidden", "m.csv", f"id,image\n{GOOD}\n.x,img/a.png\n", 3, "id", "must not start with '.'", {}),
    ("id control character", "m.csv", f"id,image\n{GOOD}\na\x7fb,img/a.png\n", 3, "id", "control or reserved characters", {}),
    ("id too long in bytes", "m.csv", f"id,image\n{GOOD}\n{TOO_LONG},img/a.png\n", 3, "id", "at most 200 bytes in UTF-8", {}),
    (
        "derived id hidden",
        "m.csv",
        "image\nimg/b.png\n.hidden.png\n",
        3,
        "image",
        "the id derived from it must not start with '.'",
        {},
    ),
    ("jsonl not an object", "m.jsonl", '{"image": "img/b.png"}\n["img/a.png"]\n', 2, None, "must be a JSON object, got list", {}),
    ("jsonl not json", "m.jsonl", '{"image": "img/b.png"}\n{"image": "img/a.png",}\n', 2, None, "not valid JSON", {}),
    (
        "jsonl pretty-printed",
        "m.jsonl",
        '{"image": "img/b.png"}\n{\n  "image": "img/a.png"\n}\n',
        2,
        None,
        "JSONL needs one whole object per line",
        {},
    ),
    (
        "jsonl unknown key",
        "m.jsonl",
        '{"image": "img/b.png"}\n{"image": "img/a.png", "motion_bucket": 3}\n',
        2,
        "motion_bucket",
        "unknown column (did you mean 'motion_bucket_id'?)",
        {},
    ),
    (
        "jsonl boolean in a number column",
        "m.jsonl",
        '{"image": "img/b.png", "fps": 7}\n{"image": "img/a.png", "fps": true}\n',
        2,
        "fps",
        "got true (a boolean)",
        {},
    ),
    (
        "jsonl float in an integer column",
        "m.jsonl",
        '{"image": "img/b.png", "fps": "7"}\n{"image": "img/a.png", "fps": 7.5}\n',
        2,
        "fps",
        "must be an integer in [1, 1000], got 7.5",
        {},
    ),
    (
        "jsonl list in a number column",
        "m.jsonl",
        '{"image": "img/b.png"}\n{"image": "img/a.png", "fps": [7]}\n',
        2,
        "fps",
        "got a JSON list",
        {},
    ),
    (
        "jsonl number as image",
        "m.jsonl",
        '{"image": "img/b.png"}\n{"image": 5}\n',
        2,
        "image",
        "must be a path string, got 5",
        {},
    ),
    (
        "jsonl boolean id",
        "m.jsonl",
        '{"image": "img/b.png"}\n{"id": false, "image": "img/a.png"}\n',
        2,
        "id",
        "got false (a boolean)",
        {},
    ),
    ("jsonl float seed", "m.jsonl", '{"image": "img/b.png"}\n{"image": "img/a.png", "seed": 42.0}\n', 2, "seed", "got 42.0", {}),
    ("jsonl NaN seed", "m.jsonl", '{"image": "img/b.png"}\n{"image": "img/a.png", "seed": NaN}\n', 2, "seed", "got nan", {}),
    # Knobs that are fine alone but fail every item together (the pipeline decides on guidance
    # from max_guidance_scale, then from linspace(min, max, num_frames)).
    (
        "min guidance above max",
        "m.csv",
        f"id,image,min_guidance_scale,max_guidance_scale\n{GOOD},,\na,img/a.png,3,1.5\n",
        3,
        "min_guidance_scale",
        "min_guidance_scale (3) must be <= max_guidance_scale (1.5)",
        CONFIG_GUIDANCE,
    ),
    (
        "max guidance below the config's min",
        "m.csv",
        f"id,image,max_guidance_scale\n{GOOD},\na,img/a.png,0.5\n",
        3,
        "max_guidance_scale",
        "min_guidance_scale (1) must be <= max_guidance_scale (0.5) (min_guidance_scale from the config)",
        CONFIG_GUIDANCE,
    ),
    (
        "max guidance rounds to 1",
        "m.csv",
        f"id,image,max_guidance_scale\n{GOOD},\na,img/a.png,1.001\n",
        3,
        "max_guidance_scale",
        "must be <= 1 (no guidance) or >= 1.01, got '1.001'",
        {},
    ),
    # Text no file name or JSON writer can hold.
    ("jsonl lone surrogate id", "m.jsonl", GOOD_JSON + '\n{"id": "\\ud800", "image": "img/a.png"}\n', 2, "id", SURROGATE, {}),
    (
        "jsonl lone surrogate image",
        "m.jsonl",
        GOOD_JSON + '\n{"id": "a", "image": "img/\\udc00.png"}\n',
        2,
        "image",
        SURROGATE,
        {},
    ),
    (
        "jsonl lone surrogate in meta",
        "m.jsonl",
        GOOD_JSON + '\n{"id": "a", "image": "img/a.png", "meta_t": ["x", "\\ud83d"]}\n',
        2,
        "meta_t",
        SURROGATE,
        {},
    ),
    (
        "jsonl lone surrogate column",
        "m.jsonl",
        GOOD_JSON + '\n{"id": "a", "image": "img/a.png", "meta_\\ud800": 1}\n',
        2,
        "meta_\\ud800",
        "column name is not valid Unicode text",
        {},
    ),
    (
        "jsonl NaN meta",
        "m.jsonl",
        GOOD_JSON + '\n{"id": "a", "image": "img/a.png", "meta_score": NaN}\n',
        2,
        "meta_score",
        "must be a finite number or text, got nan (JSON has no NaN or Infinity)",
        {},
    ),
    (
        "jsonl 1e999 meta",
        "m.jsonl",
        GOOD_JSON + '\n{"id": "a", "image": "img/a.png", "meta_score": 1e999}\n',
        2,
        "meta_score",
        "got inf",
        {},
    ),
    (
        "jsonl nested -Infinity meta",
        "m.jsonl",
        GOOD_JSON + '\n{"id": "a", "image": "img/a.png", "meta_x": {"y": [-Infinity]}}\n',
        2,
        "meta_x",
        "got -inf",
        {},
    ),
    (
        "jsonl 5000-digit integer",
        "m.jsonl",
        GOOD_JSON + '\n{"id": "a", "image": "img/a.png", "meta_n": 1' + "0" * 5000 + "}\n",
        2,
        None,
        "JSON that cannot be read (ValueError: Exceeds the limit",
        {},
    ),
    (
        "jsonl nested 100k deep",
        "m.jsonl",
        GOOD_JSON + '\n{"image": "img/a.png", "meta_x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        2,
        None,
        "JSON that cannot be read (RecursionError",
        {},
    ),
    # Ids that are distinct here but one file on macOS or Windows, or no file on Windows.
    (
        "ids differing by case",
        "m.csv",
        "id,image\nCase,img/b.png\ncase,img/a.png\n",
        3,
        "id",
        "id 'case' and 'Case' on line 2 differ only by case or Unicode normalisation",
        {},
    ),
    (
        "ids differing by normalisation",
        "m.csv",
        "id,image\ncaf\u00e9,img/b.png\ncafe\u0301,img/a.png\n",
        3,
        "id",
        "and 'caf\u00e9' on line 2 differ only by case or Unicode normalisation",
        {},
    ),
    (
        "ids differing by case folding",
        "m.jsonl",
        '{"id": "STRASSE", "image": "img/b.png"}\n{"id": "stra\u00dfe", "image": "img/a.png"}\n',
        2,
        "id",
        "differ only by case",
        {},
    ),
    ("id CON", "m.csv", f"id,image\n{GOOD}\nCON,img/a.png\n", 3, "id", "reserved device name on Windows", {}),
    ("id nul.txt", "m.csv", f"id,image\n{GOOD}\nnul.txt,img/a.png\n", 3, "id", "reserved device name on Windows", {}),
    ("id com1", "m.csv", f"id,image\n{GOOD}\ncom1,img/a.png\n", 3, "id", "reserved device name on Windows", {}),
    ("id Lpt9.tar.gz", "m.csv", f"id,image\n{GOOD}\nLpt9.tar.gz,img/a.png\n", 3, "id", "reserved device name on Windows", {}),
    (
        "id aux with a space",
        "m.jsonl",
        GOOD_JSON + '\n{"id": "aux .x", "image": "img/a.png"}\n',
        2,
        "id",
        "reserved device name",
        {},
    ),
    ("id ending in a dot", "m.csv", f"id,image\n{GOOD}\nv1.,img/a.png\n", 3, "id", "must not end with '.' or a space", {}),
    # The csv module's own limit is 128 KiB; svdbatch reads cells up to 16 MiB and names the column beyond.
    (
        "CSV cell over the limit",
        "m.csv",
        lambda: f"id,image,meta_caption\n{GOOD},\na,img/a.png,{'x' * HUGE_CELL}\n",
        3,
        "meta_caption",
        "a field is larger than 16,777,216 characters",
        {},
    ),
]


FILE_LEVEL = {
    "empty file",
    "header only",
    "semicolon delimiter",
    "tab delimiter",
    "missing image column",
    "misspelt column",
    "unnamed column",
    "duplicate column",
    "unclosed quote",
    "not UTF-8",
    "UTF-16",
    "CSV cell over the limit",
}


@pytest.mark.parametrize(
    "name,file_name,content,line,field,fragment,kwargs",
    CATALOGUE,
    ids=[case[0].encode("ascii", "backslashreplace").decode() for case in CATALOGUE],
)
def test_catalogue(data, tmp_path, name, file_name, content, line, field, fragment, kwargs):
    manifest = data / file_name
    outside = str(tmp_path / "outside.png")
    if callable(content):  # too big to keep in the parameter list
        content = content()
    if isinstance(content, bytes):
        manifest.write_bytes(content)
    else:
        manifest.write_text(content.replace("$OUTSIDE", outside), encoding="utf-8")
    kwargs = {key: str(data) if value == "$ROOT" else value for key, value in kwargs.items()}
    problems = problems_of(manifest, **kwargs)
    where = f"{manifest}:{line}: " if line is not None else f"{manifest}: "
    what = f"field '{field}': " if field else ""
    matching = [p for p in problems if p.startswith(where + what) and fragment in p]
    assert matching, f"no problem starts with {where + what!r} and contains {fragment!r}: {problems}"
    if name in FILE_LEVEL:  # fatal even when not strict: nothing in the file can be trusted
        problems_of(manifest, strict=False, **kwargs)
    else:  # not strict: the good first row survives, the bad one is reported with its line
        result = read_manifest(manifest, strict=False, **kwargs)
        assert len(result.items) == 1 and line in [bad[0] for bad in result.bad_rows]


def test_catalogue_is_broad():
    assert len(CATALOGUE) >= 20
    assert len({case[0] for case in CATALOGUE}) == len(CATALOGUE)


def test_bom_csv_and_jsonl_work_normally(data):
    csv_path = data / "bom.csv"
    csv_path.write_bytes("\ufeffid,image,seed\nx,img/a.png,3\n".encode())
    jsonl_path = data / "bom.jsonl"
    jsonl_path.write_bytes('\ufeff{"id": "x", "image": "img/a.png", "seed": 3}\n'.encode())
    for path in (csv_path, jsonl_path):
        (item,) = read_manifest(path).items
        assert (item.id, item.seed, Path(item.image)) == ("x", 3, data / "img" / "a.png")


def test_consistent_number_types_across_csv_and_jsonl(data):
    """'7', 7 and 7.0 mean the same integer in either format (pandas writes 7.0)."""
    csv_items = read_manifest(
        write_csv(data / "m.csv", ["id", "image", "fps"], [["a", "img/a.png", "7.0"], ["b", "img/b.png", " 7 "]])
    ).items
    jsonl = data / "m.jsonl"
    jsonl.write_text('{"id": "a", "image": "img/a.png", "fps": "7"}\n{"id": "b", "image": "img/b.png", "fps": 7.0}\n')
    jsonl_items = read_manifest(jsonl).items
    assert [i.overrides for i in csv_items] == [i.overrides for i in jsonl_items] == [{"fps": 7}, {"fps": 7}]


# -- images that are odd but fine: converted, not refused ------------------------------


def odd_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    grey = (np.arange(64 * 80).reshape(64, 80) % 256).astype(np.uint8)
    made = {
        "grey.png": Image.fromarray(grey, "L"),
        "grey-alpha.png": Image.fromarray(np.stack([grey, 255 - grey], -1), "LA"),
        "rgba.png": Image.fromarray(grey).convert("RGBA"),
        "bilevel.png": Image.fromarray(grey).convert("1"),
        "deep.png": Image.fromarray(grey.astype(np.uint16) * 257),
        "cmyk.jpg": Image.fromarray(grey).convert("CMYK"),
    }
    paths = {}
    for name, image in made.items():
        image.save(folder / name)
        paths[name] = folder / name
    palette = Image.fromarray(grey % 4, "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(folder / "palette-transparent.png", transparency=0)
    paths["palette-transparent.png"] = folder / "palette-transparent.png"
    return paths


def test_odd_modes_pass_validation_and_load_as_rgb(tmp_path):
    paths = odd_images(tmp_path / "img")
    modes = {name: Image.open(path).mode for name, path in paths.items()}
    assert modes == {
        "grey.png": "L",
        "grey-alpha.png": "LA",
        "rgba.png": "RGBA",
        "bilevel.png": "1",
        "deep.png": "I;16",
        "cmyk.jpg": "CMYK",
        "palette-transparent.png": "P",
    }
    manifest = write_csv(tmp_path / "m.csv", ["image"], [[f"img/{name}"] for name in paths])
    assert len(read_manifest(manifest).items) == len(paths)  # decoded during validation, none refused
    for name, path in paths.items():
        image = load_rgb(path)
        assert (image.mode, image.size) == ("RGB", (80, 64)), name


# -- ids ---------------------------------------------------------------------------------


def test_unicode_ids_are_accepted(data):
    manifest = write_csv(data / "m.csv", ["id", "image"], [["café-東京", "img/a.png"], ["naïve ünïcode", "img/b.png"]])
    assert [i.id for i in read_manifest(manifest).items] == ["café-東京", "naïve ünïcode"]


@pytest.mark.parametrize("bad_id", ["a/b", "../x", "..", ".x", "a\\b", "/abs", "C:x"])
def test_ids_that_could_leave_the_run_dir_are_refused(data, bad_id):
    manifest = data / "m.jsonl"
    manifest.write_text(json.dumps({"id": bad_id, "image": "img/a.png"}) + "\n")
    (problem,) = problems_of(manifest)
    assert problem.startswith(f"{manifest}:1: field 'id': must not ")


# -- run.image_root ----------------------------------------------------------------------


def test_image_root_accepts_inside_and_refuses_escapes(data, tmp_path):
    outside = tmp_path / "outside.png"
    os.symlink(outside, data / "img" / "escape.png")
    os.symlink(data / "img" / "a.png", data / "img" / "alias.png")  # a link that stays inside is fine
    manifest = write_csv(
        data / "m.csv",
        ["id", "image"],
        [
            ["in", "img/a.png"],
            ["abs-in", data / "img" / "b.png"],
            ["alias", "img/alias.png"],
            ["climb", "../../x.png"],
            ["abs-out", outside],
            ["link-out", "img/escape.png"],
            ["dots", "img/../../outside.png"],
        ],
    )
    result = read_manifest(manifest, image_root=str(data), strict=False)
    assert [i.id for i in result.items] == ["in", "abs-in", "alias"]
    problems = {item_id: str(p[0]) for _, item_id, p in result.bad_rows}
    assert set(problems) == {"climb", "abs-out", "link-out", "dots"}
    for item_id, line in [("climb", 5), ("abs-out", 6), ("link-out", 7), ("dots", 8)]:
        assert problems[item_id].startswith(f"{manifest}:{line}: field 'image': resolves outside run.image_root ({data})")
    assert f"(a link to {outside})" in problems["link-out"]
    # Without a root, the same manifest is fine wherever the images are (except the missing one).
    assert len(read_manifest(manifest, strict=False).items) == 6


def test_relative_image_root_is_relative_to_the_working_directory(data, tmp_path, monkeypatch):
    manifest = write_csv(data / "m.csv", ["image"], [["img/a.png"]])
    monkeypatch.chdir(tmp_path)
    assert len(read_manifest(manifest, image_root="data").items) == 1
    assert "resolves outside run.image_root" in problems_of(manifest, image_root="data/img/folder.png")[0]
    with pytest.raises(ConfigError, match="run.image_root: not a folder: nowhere"):
        read_manifest(manifest, image_root="nowhere")


def test_validate_command_uses_the_run_settings(data, capsys):
    manifest = write_csv(data / "m.csv", ["image"], [["img/a.png"], ["../outside.png"]])
    assert validate([f"manifest={manifest}", f"run.image_root={data}"]) == 2
    assert f"{manifest}:3: field 'image': resolves outside run.image_root ({data})" in capsys.readouterr().err
    assert validate([f"manifest={manifest}", "run.max_image_pixels=5000"]) == 2
    assert "more than run.max_image_pixels (5,000)" in capsys.readouterr().err
    assert validate([f"manifest={manifest}"]) == 0


# -- run.max_image_pixels ---------------------------------------------------------------


def test_a_bomb_header_is_refused_with_our_message_not_pils(tmp_path):
    """400 megapixels claimed in a 57-byte file: refused from the header, before PIL's own
    decompression-bomb check (or any decoding) could run."""
    bomb = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    expected = "image is 20000x20000 = 400,000,000 pixels, more than run.max_image_pixels (100,000,000)"
    with pytest.raises(ImageProblem, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_image(bomb)
    with pytest.raises(ImageProblem, match="more than run.max_image_pixels"):
        load_rgb(bomb)
    manifest = write_csv(tmp_path / "m.csv", ["image"], [["bomb.png"]])
    assert problems_of(manifest) == [
        f"{manifest}:2: field 'image': {expected}; shrink it, or raise run.max_image_pixels if it is genuine (bomb.png)"
    ]


def test_pixel_limit_applies_at_load_time_and_stays_out_of_the_key(tmp_path):
    image = make_image(tmp_path / "a.png")  # 80x64 = 5120 pixels
    with pytest.raises(ImageProblem, match="80x64 = 5,120 pixels, more than run.max_image_pixels \\(5,000\\)"):
        load_rgb(image, max_pixels=5000)
    assert load_rgb(image, max_pixels=5120).size == (80, 64)
    cond = make_cfg().conditioning
    limited, default = Preprocess.from_config(cond, max_image_pixels=5000), Preprocess.from_config(cond)
    assert limited.max_image_pixels == 5000 and default.max_image_pixels == 100_000_000
    assert limited.as_dict() == default.as_dict() and limited == default  # same frames, same key


def test_pixel_limit_fails_the_item_at_load_time_when_validation_skips_decoding(tmp_path):
    make_image(tmp_path / "img" / "a.png")  # 80x64
    manifest = write_csv(tmp_path / "m.csv", ["id", "image"], [["a", "img/a.png"]])
    summary = run(
        make_cfg(
            f"manifest={manifest}",
            f"run.dir={tmp_path / 'run'}",
            "run.check_images=false",
            "run.max_image_pixels=1000",
            "run.num_threads=1",
        )
    )
    assert (summary.done, summary.failed) == (0, 1)
    (failure,) = failures_of(tmp_path / "run")
    assert failure["id"] == "a" and "more than run.max_image_pixels (1,000)" in failure["error"]


# -- no lost data --------------------------------------------------------------------------


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every finished output: videos, sidecars and the results records."""
    files = [*run_dir.glob("videos/**/*"), *run_dir.glob("items/**/*"), *run_dir.glob("records/*.results.jsonl")]
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in files if f.is_file()}


def test_a_bad_rerun_keeps_finished_work_and_unicode_ids_name_files(data, tmp_path):
    run_dir = tmp_path / "run"
    good = write_csv(data / "good.csv", ["id", "image", "seed"], [["café-東京", "img/a.png", 1], ["b", "img/b.png", 2]])
    settings = [f"run.dir={run_dir}", "run.num_threads=1", "run.progress=false", "run.gallery=false"]
    first = run(make_cfg(f"manifest={good}", *settings))
    assert (first.done, first.failed) == (2, 0)
    assert (video_file(run_dir, "café-東京", ".mp4")).is_file() and (sidecar_file(run_dir, "café-東京")).is_file()
    before = snapshot(run_dir)

    # Strict: the bad row stops the run before anything in the run dir is touched.
    rows = [["café-東京", "img/a.png", 1], ["b", "img/b.png", 2], ["bad", "img/a.png", "-5"], ["c", "img/a.png", 3]]
    bad = write_csv(data / "bad.csv", ["id", "image", "seed"], rows)
    proc = run_cli(f"manifest={bad}", f"hydra.run.dir={run_dir}", *FAST, "run.num_threads=1", "run.progress=false")
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}:4: field 'seed': must be an integer in [0, 2**64), got -5" in proc.stderr
    assert snapshot(run_dir) == before
    assert not failures_of(run_dir)

    # Not strict: the bad row is recorded, finished items are kept, the new good row runs.
    second = run(make_cfg(f"manifest={bad}", *settings, "run.strict=false"))
    assert (second.done, second.skipped, second.invalid) == (1, 2, 1)
    after = snapshot(run_dir)
    for name, data in before.items():
        if name.startswith("records/"):
            assert after[name].startswith(data), name  # only appended to
        else:
            assert after[name] == data, name
    (failure,) = failures_of(run_dir)
    assert (failure["id"], failure["line"]) == ("bad", 4) and "field 'seed'" in failure["problems"][0]


# -- config values that could only fail later: refused up front, naming the field -------------

CONFIG_CATALOGUE = [
    (["conditioning.num_frames=1"], "conditioning.num_frames: must be an integer in [2, 1024], got 1"),
    (
        ["conditioning.min_guidance_scale=3", "conditioning.max_guidance_scale=2"],
        "conditioning.min_guidance_scale: min_guidance_scale (3) must be <= max_guidance_scale (2)",
    ),
    (["conditioning.max_guidance_scale=1.0001"], "conditioning.max_guidance_scale: must be <= 1 (no guidance) or >= 1.01"),
    (["model.num_frames=1"], "model.num_frames: must be an integer in [2, 1024], got 1"),
    (["memory.max_decode_chunk_size=0"], "memory.max_decode_chunk_size: must be an integer in [1, 1024], got 0"),
    (["+model.fixed_conditioning.motion_bucket=1"], "model.fixed_conditioning: unknown parameter 'motion_bucket'"),
    (["+model.fixed_conditioning.fps=0"], "model.fixed_conditioning.fps: must be an integer in [1, 1000], got 0"),
    (["run.num_threads=-1"], "run.num_threads: must be >= 1 or null, got -1"),
    (["run.num_threads=0"], "run.num_threads: must be >= 1 or null, got 0"),
    (["run.limit=-1"], "run.limit: must be >= 0 or null, got -1"),
    (["run.workers=0"], "run.workers: must be >= 1, got 0"),
    (["run.batch_size=0"], "run.batch_size: must be >= 1, got 0"),
    (["run.max_image_pixels=0"], "run.max_image_pixels: must be >= 1, got 0"),
    (["run.min_free_mb=-1"], "run.min_free_mb: must be >= 0, got -1"),
    (["run.gallery_every_s=-1"], "run.gallery_every_s: must be >= 0, got -1.0"),
    (["run.gallery_every_s=nan"], "run.gallery_every_s: must be a finite number >= 0, got nan"),
    (["run.gallery_max_items=-1"], "run.gallery_max_items: must be >= 0, got -1"),
    (["output.fps=0"], "output.fps: must be in [1, 1000] or null, got 0"),
    (["output.quality=11"], "output.quality: must be in [0, 10], got 11.0"),
    (["output.quality=-0.5"], "output.quality: must be in [0, 10], got -0.5"),
    (["output.quality=nan"], "output.quality: must be a finite number in [0, 10], got nan"),
    (["output.loop=-1"], "output.loop: must be in [0, 65535], got -1"),
    (["output.loop=70000"], "output.loop: must be in [0, 65535], got 70000"),
    (["output.shard_size=0"], "output.shard_size: must be >= 1, got 0"),
    (["fetch.backoff_s=nan"], "fetch.backoff_s: must be >= 0 and finite, got nan"),
    (["fetch.timeout_s=inf"], "fetch.timeout_s: must be > 0 and finite, got inf"),
    (["fetch.deadline_s=0"], "fetch.deadline_s: must be > 0 and finite, got 0.0"),
    (["fetch.workers=0"], "fetch.workers: must be >= 1, got 0"),
    (["model=svd", "model.source=/no/such/dir"], "model.source: no such directory: /no/such/dir"),
]


@pytest.mark.parametrize("overrides,expected", CONFIG_CATALOGUE, ids=[" ".join(case[0]) for case in CONFIG_CATALOGUE])
def test_config_catalogue(data, capsys, overrides, expected):
    manifest = write_csv(data / "m.csv", ["image"], [["img/a.png"]])
    assert validate([f"manifest={manifest}", *overrides]) == 2
    err = capsys.readouterr().err
    assert "invalid config:" in err and expected in err, err


def test_config_catalogue_covers_the_reported_holes():
    keys = {override.split("=")[0].lstrip("+") for overrides, _ in CONFIG_CATALOGUE for override in overrides}
    assert {"conditioning.num_frames", "run.num_threads", "run.limit", "output.fps", "output.quality", "model.source"} <= keys


def test_a_misspelt_override_is_a_message_not_a_traceback(data, capsys):
    manifest = write_csv(data / "m.csv", ["image"], [["img/a.png"]])
    assert validate([f"manifest={manifest}", "conditioning.motion_bucket=3"]) == 2
    assert "Could not override 'conditioning.motion_bucket'" in capsys.readouterr().err


def test_user_agent_with_a_newline_is_refused():
    from svdbatch.core.config import FetchConfig
    from svdbatch.inputs.fetch import check_fetch_config

    assert check_fetch_config(FetchConfig(user_agent="svdbatch\r\nX-Injected: 1")) == [
        "fetch.user_agent: must not contain control characters such as newlines, got 'svdbatch\\r\\nX-Injected: 1'"
    ]


def test_limit_zero_runs_nothing_and_edge_values_pass(data, capsys):
    manifest = write_csv(data / "m.csv", ["image"], [["img/a.png"]])
    edges = [
        "run.limit=0",
        "run.num_threads=1",
        "output.fps=1",
        "output.quality=0",
        "output.quality=10",
        "conditioning.num_frames=2",
        "conditioning.min_guidance_scale=3",
        "conditioning.max_guidance_scale=3",
        "conditioning.max_guidance_scale=1.01",
        "run.gallery_every_s=0",
    ]
    for edge in edges:
        assert validate([f"manifest={manifest}", edge]) == 0, (edge, capsys.readouterr().err)


def test_bad_config_exits_2_before_the_model_loads(tmp_path, images):
    """The commands from the issue, as users type them: exit 2 with the field named, no
    traceback, no item attempted."""
    manifest = write_csv(tmp_path / "m.csv", ["image"], [["img/a.png"]])
    run_dir = tmp_path / "run"
    proc = run_cli(f"manifest={manifest}", f"hydra.run.dir={run_dir}", *FAST, "run.num_threads=-1", "conditioning.num_frames=1")
    assert proc.returncode == 2, proc.stderr
    assert "run.num_threads: must be >= 1 or null, got -1" in proc.stderr
    assert "conditioning.num_frames: must be an integer in [2, 1024], got 1" in proc.stderr
    assert "Traceback" not in proc.stderr and "loaded tiny" not in proc.stderr
    assert not failures_of(run_dir) and not (run_dir / "items").exists()


def test_a_row_overriding_guidance_is_checked_against_the_config(data):
    """The driver passes the config's guidance to the manifest check: a row that sets only max
    below the config's min is refused with both values."""
    manifest = write_csv(data / "m.csv", ["image", "max_guidance_scale"], [["img/a.png", "2"]])
    cfg = make_cfg(f"manifest={manifest}", "conditioning.min_guidance_scale=2.5")
    from svdbatch.engine.prepare import load_manifest

    with pytest.raises(ManifestError) as info:
        load_manifest(cfg)
    assert str(info.value.problems[0]) == (
        f"{manifest}:2: field 'max_guidance_scale': min_guidance_scale (2.5) must be <= max_guidance_scale (2) (min_guidance_scale from the config)"
    )
    assert len(load_manifest(make_cfg(f"manifest={manifest}")).items) == 1  # config min 1: fine


def test_a_200_kb_cell_is_read(data):
    """Over the csv module's default 128 KiB limit, well under svdbatch's."""
    caption = "a long caption " * 14_000  # 210,000 characters
    manifest = write_csv(data / "m.csv", ["image", "meta_caption"], [["img/a.png", caption]])
    (item,) = read_manifest(manifest).items
    assert item.meta == {"meta_caption": caption}


def test_written_json_is_never_nan():
    from svdbatch.core.jsonl import to_json

    with pytest.raises(ValueError):
        to_json({"meta_x": float("nan")})
