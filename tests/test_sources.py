"""minisora.data.sources: manifests (CSV, JSONL), caption folders, class folders -> ClipRecords."""

from __future__ import annotations

import json
import os

import pytest

from minisora.data.sources import ClipRecord, class_caption, detect_format, load_records


@pytest.fixture
def clip_folder(tmp_path, make_video, make_image):
    """data/: two videos in clips/, one image, all referenced relative to data/."""
    make_video("data/clips/a.mp4", num_frames=10)
    make_video("data/clips/b.mp4", num_frames=12)
    make_image("data/stills/c.png")
    return tmp_path / "data"


def test_csv_manifest_with_relative_paths_and_optional_columns(clip_folder):
    (clip_folder / "train.csv").write_text(
        "path,caption,label,start,end\n"
        'clips/a.mp4,"a red circle, moving left",3,0.5,1.5\n'
        "clips/b.mp4,a blue square,,,\n"
        "stills/c.png,  a still image  ,7,,\n"
    )
    records, skipped = load_records(str(clip_folder / "train.csv"))
    assert skipped == []
    assert records == [
        ClipRecord(str(clip_folder / "clips/a.mp4"), "a red circle, moving left", 3, 0.5, 1.5, source_line=2),
        ClipRecord(str(clip_folder / "clips/b.mp4"), "a blue square", -1, None, None, source_line=3),
        ClipRecord(str(clip_folder / "stills/c.png"), "a still image", 7, None, None, source_line=4),
    ]
    assert all(os.path.isabs(r.path) for r in records)


def test_jsonl_manifest_and_absolute_paths(clip_folder, tmp_path):
    rows = [
        {"path": "clips/a.mp4", "caption": "first", "start": 0.2},
        {"path": str(clip_folder / "clips/b.mp4"), "caption": "second", "label": 1, "end": 1},
    ]
    manifest = tmp_path / "elsewhere" / "m.jsonl"
    manifest.parent.mkdir()
    (clip_folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    manifest.write_text(json.dumps(rows[1]) + "\n")
    records, _ = load_records(str(clip_folder / "m.jsonl"))
    assert [(r.caption, r.label, r.start, r.end, r.source_line) for r in records] == [
        ("first", -1, 0.2, None, 1),
        ("second", 1, None, 1.0, 2),
    ]
    assert records[0].path == str(clip_folder / "clips/a.mp4")
    # An absolute path does not depend on where the manifest is.
    assert load_records(str(manifest))[0][0].path == str(clip_folder / "clips/b.mp4")


def test_folder_with_manifest_reads_it(clip_folder):
    (clip_folder / "manifest.csv").write_text("path,caption\nclips/b.mp4,only b\n")
    assert detect_format(clip_folder) == "manifest"
    records, _ = load_records(str(clip_folder))
    assert [r.caption for r in records] == ["only b"]


def test_missing_files_are_skipped_with_one_warning_naming_lines(clip_folder):
    (clip_folder / "m.csv").write_text(
        "path,caption\nclips/a.mp4,ok\nclips/gone.mp4,missing one\n\nclips/b.mp4,ok too\nclips/gone2.mp4,missing two\n"
    )
    with pytest.warns(UserWarning) as caught:
        records, skipped = load_records(str(clip_folder / "m.csv"))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 row(s)" in message and "line 3: clips/gone.mp4" in message and "line 6: clips/gone2.mp4" in message
    assert [r.caption for r in records] == ["ok", "ok too"]
    assert [p for p, _ in skipped] == [str(clip_folder / "clips/gone.mp4"), str(clip_folder / "clips/gone2.mp4")]
    assert "line 3" in skipped[0][1] and "not found" in skipped[0][1]


def test_missing_column_names_file_and_columns(clip_folder):
    (clip_folder / "m.csv").write_text("file,caption\nclips/a.mp4,x\n")
    with pytest.raises(ValueError, match=r"m\.csv, line 1: missing column\(s\) 'path'"):
        load_records(str(clip_folder / "m.csv"))
    (clip_folder / "m.jsonl").write_text('{"path": "clips/a.mp4", "caption": "x"}\n{"path": "clips/b.mp4"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2: missing key\(s\) 'caption'"):
        load_records(str(clip_folder / "m.jsonl"))


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"path": "clips/a.mp4", "caption": "x"}\n{"path": "clips/b.mp4", caption: 1}\n', r"line 2: malformed JSON"),
        (
            '{"path": "clips/a.mp4", "caption": "x", "label": "cat"}\n',
            r"line 1, column 'label': expected an integer, got 'cat'",
        ),
        ('{"path": "clips/a.mp4", "caption": "x", "start": "soon"}\n', r"line 1, column 'start': expected seconds"),
        (
            '{"path": "clips/a.mp4", "caption": "x", "start": 2, "end": 1}\n',
            r"line 1: 'end' \(1 s\) must be after 'start'",
        ),
        ('["clips/a.mp4", "x"]\n', r"line 1: expected a JSON object"),
    ],
)
def test_bad_jsonl_values_name_file_line_and_column(clip_folder, text, message):
    (clip_folder / "m.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        load_records(str(clip_folder / "m.jsonl"))
    assert "m.jsonl" in str(e.value)


def test_bad_csv_values_name_line_and_column(clip_folder):
    (clip_folder / "m.csv").write_text("path,caption,label,start\nclips/a.mp4,x,1,0\nclips/b.mp4,y,2,-3\n")
    with pytest.raises(ValueError, match=r"m\.csv, line 3, column 'start': expected seconds >= 0, got '-3'"):
        load_records(str(clip_folder / "m.csv"))
    (clip_folder / "m.csv").write_text("path,caption,label\nclips/a.mp4,x,1.5\n")
    with pytest.raises(ValueError, match=r"line 2, column 'label': expected an integer, got '1.5'"):
        load_records(str(clip_folder / "m.csv"))
    (clip_folder / "m.csv").write_text("path,caption\nclips/a.mp4,a cat, sitting\n")
    with pytest.raises(ValueError, match=r"line 2: 3 fields for 2 columns; quote captions that contain commas"):
        load_records(str(clip_folder / "m.csv"))


def test_nothing_usable_names_the_manifest(clip_folder):
    (clip_folder / "m.csv").write_text("path,caption\nclips/nope.mp4,x\n")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"m\.csv: no usable clips.*nope\.mp4"):
        load_records(str(clip_folder / "m.csv"))
    (clip_folder / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: empty manifest"):
        load_records(str(clip_folder / "empty.csv"))
    with pytest.raises(FileNotFoundError, match="no_such.csv"):
        load_records(str(clip_folder / "no_such.csv"))


def test_caption_folder_mixes_images_and_videos(tmp_path, make_video, make_image):
    make_video("cap/walk.mp4")
    (tmp_path / "cap/walk.txt").write_text("a man walking\n  in the rain\n")
    make_image("cap/sub/tree.jpg")
    (tmp_path / "cap/sub/tree.txt").write_text("a tree")
    make_video("cap/orphan.mp4")  # no caption: skipped and reported
    (tmp_path / "cap/notes.md").write_text("not media")
    make_video("cap/.cache/hidden.mp4")  # hidden folders are not data
    assert detect_format(tmp_path / "cap") == "captions"
    with pytest.warns(UserWarning, match=r"1 media file\(s\) without a \.txt caption.*orphan\.mp4"):
        records, skipped = load_records(str(tmp_path / "cap"))
    assert {(os.path.basename(r.path), r.caption, r.label) for r in records} == {
        ("walk.mp4", "a man walking in the rain", -1),
        ("tree.jpg", "a tree", -1),
    }
    assert skipped == [(str(tmp_path / "cap/orphan.mp4"), "no caption file orphan.txt")]


@pytest.mark.parametrize(
    "name, caption",
    [
        ("ApplyEyeMakeup", "apply eye makeup"),
        ("playing_guitar", "playing guitar"),
        ("YoYo", "yo yo"),
        ("PlayingDaf", "playing daf"),
        ("jumping-jack", "jumping jack"),
        ("TVShow", "tv show"),
        ("Archery", "archery"),
    ],
)
def test_class_caption(name, caption):
    assert class_caption(name) == caption


def test_class_folders_label_by_sorted_name(tmp_path, make_video, make_image):
    make_video("ucf/PlayingGuitar/g01.mp4")
    make_video("ucf/PlayingGuitar/g02.mp4")
    make_video("ucf/ApplyEyeMakeup/v1.mp4")
    make_image("ucf/apply_lipstick/still.png")
    (tmp_path / "ucf/Empty").mkdir()
    assert detect_format(tmp_path / "ucf") == "classes"
    records, skipped = load_records(str(tmp_path / "ucf"))
    assert skipped == []
    got = sorted((os.path.relpath(r.path, tmp_path / "ucf"), r.caption, r.label) for r in records)
    assert got == [
        ("ApplyEyeMakeup/v1.mp4", "apply eye makeup", 0),
        ("PlayingGuitar/g01.mp4", "playing guitar", 1),
        ("PlayingGuitar/g02.mp4", "playing guitar", 1),
        ("apply_lipstick/still.png", "apply lipstick", 2),  # sorted() is case-sensitive: upper case first
    ]


def test_format_argument_is_checked_and_forces_the_reader(tmp_path, make_video):
    make_video("v/a.mp4")
    (tmp_path / "v/a.txt").write_text("caption")
    with pytest.raises(ValueError, match="format must be one of auto, manifest, captions, classes, got 'csv'"):
        load_records(str(tmp_path / "v"), format="csv")
    with pytest.raises(ValueError, match="no usable clips"):
        load_records(str(tmp_path / "v"), format="classes")
    assert len(load_records(str(tmp_path / "v"), format="captions")[0]) == 1
    with pytest.raises(ValueError, match="cannot tell the layout"):
        (tmp_path / "nothing").mkdir()
        load_records(str(tmp_path / "nothing"))
