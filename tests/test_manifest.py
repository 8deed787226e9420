"""Manifest parsing and validation: every class of bad input names file, line and field."""

from pathlib import Path

import pytest

from svdbatch.core.errors import ManifestError
from svdbatch.inputs.ids import derive_seed
from svdbatch.inputs.manifest import read_manifest
from tests.conftest import SAMPLE_CSV, make_image, write_csv, write_jsonl


def problems_of(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as info:
        read_manifest(path, **kwargs)
    return [str(p) for p in info.value.problems]


def test_sample_csv_and_jsonl_agree():
    csv_items = read_manifest(SAMPLE_CSV).items
    jsonl_items = read_manifest(SAMPLE_CSV.with_suffix(".jsonl")).items
    strip = lambda items: [(i.id, i.image, i.seed, i.overrides) for i in items]  # noqa: E731
    assert strip(csv_items) == strip(jsonl_items)
    assert [i.id for i in csv_items] == ["sunset", "rocket", "waves"]
    assert csv_items[1].overrides == {"motion_bucket_id": 180, "noise_aug_strength": 0.05}


def test_paths_are_relative_to_the_manifest_and_ids_and_seeds_are_derived(tmp_path, images):
    (tmp_path / "sub").mkdir()
    manifest = write_csv(tmp_path / "sub" / "m.csv", ["image"], [["../img/a.png"], ["../img/b.png"]])
    items = read_manifest(manifest, run_seed=5).items
    assert [Path(i.image) for i in items] == [images["a"], images["b"]]
    assert [i.id for i in items] == ["img__a", "img__b"]
    assert items[0].seed == derive_seed(5, "img__a") and items[0].seed_derived
    assert read_manifest(manifest, run_seed=6).items[0].seed != items[0].seed  # run seed feeds derived seeds


def test_meta_columns_are_carried(tmp_path, images):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "img/a.png", "meta_caption": "a cat", "meta_score": 0.5}])
    assert read_manifest(manifest).items[0].meta == {"meta_caption": "a cat", "meta_score": 0.5}


def test_bom_and_blank_lines_are_fine(tmp_path, images):
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffid,image\n\nx,img/a.png\n\n".encode("utf-8"))
    assert [i.id for i in read_manifest(path).items] == ["x"]


@pytest.mark.parametrize(
    "header,row,field,fragment",
    [
        (["id", "image", "seed"], ["x", "img/a.png", "-1"], "seed", "[0, 2**64)"),
        (["id", "image", "seed"], ["x", "img/a.png", "1.5"], "seed", "integer"),
        (["id", "image", "seed"], ["x", "img/a.png", str(2**64)], "seed", "[0, 2**64)"),
        (["id", "image", "motion_bucket_id"], ["x", "img/a.png", "256"], "motion_bucket_id", "[0, 255]"),
        (["id", "image", "noise_aug_strength"], ["x", "img/a.png", "nan"], "noise_aug_strength", "finite"),
        (["id", "image", "width"], ["x", "img/a.png", "100"], "width", "multiple of 8"),
        (["id", "image", "num_frames"], ["x", "img/a.png", "0"], "num_frames", "[2, 1024]"),
        (["id", "image", "fps"], ["x", "img/a.png", "fast"], "fps", "integer"),
        (["id", "image"], ["x", "img/missing.png"], "image", "not found"),
        (["id", "image"], ["x", ""], "image", "required"),
        (["id", "image"], ["a/../x", "img/a.png"], "id", "path separators"),
        (["id", "image"], [".hidden", "img/a.png"], "id", "must not start with '.'"),
        (["id", "image"], ["x", "ftp://example.com/a.png"], "image", "only http:// and https:// URLs"),
        (["id", "image", "resize"], ["x", "img/a.png", "fit"], "resize", "must be one of crop, pad, stretch, none"),
        (["id", "image"], ["x", "https:///a.png"], "image", "URL has no host"),
    ],
)
def test_bad_values_name_file_line_and_field(tmp_path, images, header, row, field, fragment):
    manifest = write_csv(tmp_path / "m.csv", header, [["ok", "img/b.png"] + [""] * (len(header) - 2), row])
    (problem,) = problems_of(manifest)
    assert problem.startswith(f"{manifest}:3: field '{field}': ")
    assert fragment in problem


def test_all_problems_are_reported_at_once(tmp_path, images):
    manifest = write_csv(
        tmp_path / "m.csv",
        ["id", "image", "seed"],
        [["a", "img/a.png", "x"], ["a", "img/b.png", "1"], ["c", "img/none.png", "2"]],
    )
    problems = problems_of(manifest)
    assert len(problems) == 3
    assert "line 2" in problems[1] and "duplicate id 'a'" in problems[1]


def test_unknown_and_missing_columns_are_fatal_file_level_errors(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["id", "imagee", "motion_bucket"], [["a", "img/a.png", "3"]])
    problems = problems_of(manifest, strict=False)
    assert any("field 'imagee': unknown column" in p for p in problems)
    assert any("field 'motion_bucket': unknown column" in p for p in problems)
    assert any("field 'image': required column is missing" in p for p in problems)


def test_wrong_delimiter_gets_a_hint(tmp_path, images):
    path = tmp_path / "m.csv"
    path.write_text("id;image\na;img/a.png\n")
    assert any("comma-separated" in p for p in problems_of(path))


@pytest.mark.parametrize("content", ["", "id,image\n"])
def test_empty_manifest(tmp_path, content):
    path = tmp_path / "m.csv"
    path.write_text(content)
    assert problems_of(path) == [f"{path}: manifest has no rows"]


def test_ragged_csv_row(tmp_path, images):
    path = tmp_path / "m.csv"
    path.write_text("id,image\na,img/a.png,extra\n")
    assert problems_of(path) == [f"{path}:2: row has 3 fields but the header has 2"]


def test_jsonl_line_problems(tmp_path, images):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "img/a.png"}\n[1, 2]\n{not json\n{"image": "img/b.png", "sede": 3}\n{"image": 5}\n')
    problems = problems_of(path)
    assert problems[0] == f"{path}:2: must be a JSON object, got list"
    assert problems[1].startswith(f"{path}:3: not valid JSON")
    assert problems[2].startswith(f"{path}:4: field 'sede': unknown column")
    assert problems[3].startswith(f"{path}:5: field 'image': must be a path string")


def test_jsonl_types_are_checked(tmp_path, images):
    path = write_jsonl(tmp_path / "m.jsonl", [{"image": "img/a.png", "seed": True}, {"image": "img/b.png", "fps": "7x"}])
    problems = problems_of(path)
    assert "field 'seed'" in problems[0] and "field 'fps'" in problems[1]


def test_unreadable_image_is_caught_before_the_model_loads(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "fake.png").write_bytes(b"this is not a png")
    good = make_image(tmp_path / "img" / "good.png")
    truncated = tmp_path / "img" / "cut.png"
    truncated.write_bytes(good.read_bytes()[:-200])
    manifest = write_csv(tmp_path / "m.csv", ["image"], [["img/fake.png"], ["img/cut.png"]])
    problems = problems_of(manifest)
    assert all("not a readable image" in p for p in problems) and len(problems) == 2
    # Without decoding, only existence is checked (fast path for huge manifests).
    assert len(read_manifest(manifest, check_images=False).items) == 2


def test_not_strict_keeps_good_rows_and_reports_bad_ones(tmp_path, images):
    manifest = write_csv(tmp_path / "m.csv", ["id", "image"], [["a", "img/a.png"], ["b", "img/none.png"]])
    result = read_manifest(manifest, strict=False)
    assert [i.id for i in result.items] == ["a"]
    ((line, item_id, problems),) = result.bad_rows
    assert (line, item_id) == (3, "b") and "not found" in str(problems[0])


def test_unsupported_extension_and_missing_file(tmp_path):
    (tmp_path / "x.txt").write_text("image\n")
    assert "unsupported manifest type" in problems_of(tmp_path / "x.txt")[0]
    assert problems_of(tmp_path / "nope.csv") == [f"{tmp_path / 'nope.csv'}: manifest file not found"]
