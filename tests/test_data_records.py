"""Reading Vision-Flan records (JSON list and JSONL) with their checks, skip reports, and images as RGB."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from cmlora.data import DataError, Record, SkipReport, Turn, load_image, load_records

from .data_helpers import save_image, text_record, vf_record, write_json, write_jsonl


@pytest.fixture
def data_dir(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    save_image(tmp_path / "images" / "b.png", (0, 0, 255))
    return tmp_path


def test_jsonl_and_json_list_give_the_same_records(data_dir):
    rows = [vf_record("r1", "images/a.png"), text_record(7, task=None),
            {"id": "r3", "image": None, "conversations": [{"from": "user", "value": "hi"},
                                                          {"from": "assistant", "value": "hello"}]}]
    from_jsonl, report = load_records(write_jsonl(data_dir / "d.jsonl", rows))
    from_list, _ = load_records(write_json(data_dir / "d.json", rows))
    assert not report and report.total == 0
    assert [r.id for r in from_jsonl] == ["r1", "7", "r3"]  # integer ids become strings
    assert [r.source for r in from_jsonl] == [f"{data_dir / 'd.jsonl'}:{n}" for n in (1, 2, 3)]
    assert [r.source for r in from_list] == [f"{data_dir / 'd.json'}[#{n}]" for n in (0, 1, 2)]
    for a, b in zip(from_jsonl, from_list, strict=True):
        assert (a.id, a.conversations, a.image, a.task_name) == (b.id, b.conversations, b.image, b.task_name)
    first = from_jsonl[0]
    assert isinstance(first, Record)
    assert first.conversations == [Turn("user", "<image>\nWhat colour is it?"), Turn("assistant", "red")]
    assert first.image == data_dir / "images" / "a.png" and first.task_name == "color"
    assert from_jsonl[1].image is None and from_jsonl[1].task_name is None
    assert [t.role for t in from_jsonl[2].conversations] == ["user", "assistant"]


def test_images_resolve_against_image_folder_else_the_data_files_folder(data_dir):
    data = write_jsonl(data_dir / "sub.jsonl", [vf_record("r1", "a.png")])
    records, _ = load_records(data, image_folder=data_dir / "images")
    assert records[0].image == data_dir / "images" / "a.png"
    with pytest.raises(DataError, match=re.escape(f"image file not found: {data_dir / 'a.png'}")):
        load_records(data)


def test_missing_image_marker_is_prepended_llava_style(data_dir):
    row = vf_record("r1", "images/a.png", turns=("What colour?", "red", "Sure?", "yes"))
    records, _ = load_records(write_jsonl(data_dir / "d.jsonl", [row]))
    assert records[0].conversations[0].text == "<image>\nWhat colour?"
    assert records[0].conversations[2].text == "Sure?"


def _turn(role, value):
    return {"from": role, "value": value}


# (name, bad row, field or problem text, reason key); each row also must name the file and its line.
BAD_ROWS = [
    ("invalid json", '{"id": "x1", "conversations": [', "invalid JSON", "invalid JSON"),
    ("not an object", ["x1"], "expected a JSON object", "not an object"),
    ("missing id", {"conversations": [_turn("human", "q"), _turn("gpt", "a")]}, "'id'", "missing field"),
    ("float id", {"id": 1.5, "conversations": [_turn("human", "q"), _turn("gpt", "a")]}, "'id'", "wrong type"),
    ("no conversations", {"id": "x1"}, "'conversations'", "missing field"),
    ("empty conversations", {"id": "x1", "conversations": []}, "'conversations'", "wrong type"),
    ("turn not object", {"id": "x1", "conversations": ["q", "a"]}, "'conversations[0]'", "wrong type"),
    ("missing from", {"id": "x1", "conversations": [{"value": "q"}]}, "'conversations[0].from'", "missing field"),
    ("value not str", {"id": "x1", "conversations": [_turn("human", "q"), _turn("gpt", 3)]},
     "'conversations[1].value'", "wrong type"),
    ("unknown role", {"id": "x1", "conversations": [_turn("human", "q"), _turn("bot", "a")]},
     "'conversations[1].from'", "unknown role"),
    ("no assistant", {"id": "x1", "conversations": [_turn("human", "q")]}, "no assistant", "no assistant turn"),
    ("turn order", {"id": "x1", "conversations": [_turn("human", "q"), _turn("human", "q"), _turn("gpt", "a")]},
     "'conversations[1].from'", "turn order"),
    ("marker without image", vf_record("x1"), "has no image", "image marker"),
    ("two markers", vf_record("x1", "images/a.png", turns=("<image><image>\nq", "a")), "2 <image> markers",
     "image marker"),
    ("marker in answer", vf_record("x1", "images/a.png", turns=("<image>\nq", "<image>")),
     "'conversations[1].value'", "image marker"),
    ("image not found", vf_record("x1", "images/nope.png"), "image file not found", "image not found"),
    ("image not str", {**vf_record("x1"), "image": 3}, "'image'", "wrong type"),
    ("task not str", {**text_record("x1"), "task_name": ["a"]}, "'task_name'", "wrong type"),
    ("duplicate id", text_record("r0"), "duplicate id", "duplicate id"),
]


@pytest.mark.parametrize(("name", "row", "problem", "reason"), BAD_ROWS, ids=[case[0] for case in BAD_ROWS])
def test_each_bad_record_names_file_line_record_and_field(data_dir, name, row, problem, reason):
    path = write_jsonl(data_dir / "train.jsonl", [text_record("r0"), row])
    with pytest.raises(DataError) as raised:
        load_records(path)
    message = str(raised.value)
    assert "train.jsonl:2" in message and problem in message and raised.value.reason == reason
    has_id = isinstance(row, dict) and "id" in row and isinstance(row["id"], str)
    if has_id:
        assert f"record {row['id']!r}" in message
    if name != "invalid json":
        assert "skip_bad_records=True" in message  # says what to do


def test_invalid_json_list_reports_line_and_column(data_dir):
    path = data_dir / "train.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]')
    with pytest.raises(DataError, match=r"train\.json:3:\d+: invalid JSON"):
        load_records(path, skip_bad_records=True)  # a broken list cannot be split into records: never skipped


def test_json_list_errors_name_the_index(data_dir):
    path = write_json(data_dir / "train.json", [text_record("r0"), text_record("r1", question="<image>\nq")])
    with pytest.raises(DataError, match=r"train\.json\[#1\]: record 'r1': field 'conversations'"):
        load_records(path)


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty.jsonl: the data file is empty"):
        load_records(path, skip_bad_records=True)


def test_skip_bad_records_keeps_the_good_ones_and_counts_each_reason(data_dir):
    rows = [vf_record("r0", "images/a.png"), "not json", text_record("r2"), vf_record("r3", "images/missing.png"),
            vf_record("r4", "images/b.png")]
    path = write_jsonl(data_dir / "train.jsonl", rows)
    with pytest.raises(DataError, match="train.jsonl:2: invalid JSON"):
        load_records(path)
    records, report = load_records(path, skip_bad_records=True)
    assert [r.id for r in records] == ["r0", "r2", "r4"]
    assert report.counts == {"invalid JSON": 1, "image not found": 1}
    assert report.total == 2 and bool(report)
    summary = report.summary()
    assert "skipped 2" in summary and "invalid JSON: 1" in summary and "image not found: 1" in summary
    assert "train.jsonl:4" in summary  # the first example of each reason says where


def test_skip_report_is_falsy_when_empty():
    assert not SkipReport() and SkipReport().total == 0 and "no records skipped" in SkipReport().summary()
    assert SkipReport({"a": 2, "b": 1}).total == 3


def test_a_file_of_only_bad_records_is_an_error_even_when_skipping(data_dir):
    path = write_jsonl(data_dir / "train.jsonl", ["nope", vf_record("r1")])
    with pytest.raises(DataError, match="no usable records"):
        load_records(path, skip_bad_records=True)


# ---- images -----------------------------------------------------------------------------------------------------

def _rgba(path):
    image = Image.new("RGBA", (8, 6), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: must show as the white background
    image.save(path)


def _palette(path):
    image = Image.new("P", (8, 6), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.save(path, transparency=0)


def _sixteen_bit(path):
    image = Image.fromarray(np.full((6, 8), 65535 // 2, dtype=np.uint16))
    assert image.mode == "I;16"
    image.save(path)


# (file name, writer, [(pixel, expected RGB)])
IMAGE_MODES = [
    ("l.png", lambda path: Image.new("L", (8, 6), 77).save(path), [((3, 3), (77, 77, 77))]),
    ("rgba.png", _rgba, [((3, 3), (255, 0, 0)), ((0, 0), (255, 255, 255))]),
    ("p.png", _palette, [((3, 3), (0, 255, 0)), ((0, 0), (255, 255, 255))]),
    ("i16.png", _sixteen_bit, [((3, 3), (127, 127, 127))]),  # scaled from 16 bits, not clipped to white
    ("cmyk.jpg", lambda path: Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(path), [((3, 3), (255, 0, 0))]),
]


@pytest.mark.parametrize(("name", "write", "pixels"), IMAGE_MODES, ids=[case[0] for case in IMAGE_MODES])
def test_images_of_every_mode_load_as_rgb(tmp_path, name, write, pixels):
    write(tmp_path / name)
    image = load_image(tmp_path / name)
    assert image.mode == "RGB" and image.size == (8, 6)
    for position, colour in pixels:
        assert np.abs(np.subtract(image.getpixel(position), colour)).max() <= 3, image.getpixel(position)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (10, 20)
    red, blue = loaded.getpixel((5, 3)), loaded.getpixel((5, 16))  # the left half is now on top
    assert red[0] > 200 and red[2] < 50 and blue[2] > 200 and blue[0] < 50


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + b"\x00" * 50])
def test_corrupt_image_raises_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read image")) as raised:
        load_image(path)
    assert raised.value.reason == "corrupt image"


def test_truncated_image_raises(tmp_path):
    path = save_image(tmp_path / "full.png", size=(64, 64))
    Image.effect_noise((64, 64), 50).save(path)
    (tmp_path / "cut.png").write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match="cut.png: cannot read image"):
        load_image(tmp_path / "cut.png")


def test_record_json_round_trip_keeps_unicode_line_separators(data_dir):
    row = text_record("r1", question="a\u2028b", answer="c\u2029d")
    path = data_dir / "u.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    records, _ = load_records(path)
    assert records[0].conversations[0].text == "a\u2028b"
