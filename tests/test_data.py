"""Reading chat datasets: both formats, relative image paths, perception spans, bad lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from surgeon.data.formats import perception_spans

from surgeon.data.samples import BadSample, DataStats, ImagePart

from surgeon.data.scan import load_samples
from surgeon.errors import ConfigError, DataError

FORMATS = ("trl", "sharegpt", "llamafactory")


def portable(sample, base: Path) -> list:
    """A sample's turns with image paths relative to the data folder."""
    return [
        (t.role, [p if isinstance(p, str) else str(p.path.relative_to(base)) for p in t.parts], t.perception)
        for t in sample.turns
    ]


def test_every_format_parses_to_the_same_samples(shapes_data):
    loaded = {fmt: load_samples(shapes_data(fmt)) for fmt in FORMATS}
    reference = [portable(s, shapes_data("trl").parent) for s in loaded["trl"]]
    for fmt in FORMATS:
        assert [portable(s, shapes_data(fmt).parent) for s in loaded[fmt]] == reference, fmt
        assert [s.meta for s in loaded[fmt]] == [s.meta for s in loaded["trl"]]


def test_kinds_images_and_perception(shapes_data):
    samples = load_samples(shapes_data("sharegpt"))
    kinds = {s.meta["kind"]: s for s in samples}
    assert len(kinds["multi"].images) == 2 and len(kinds["shapes"].images) == 1
    assert kinds["text"].images == [] and kinds["text"].turns[0].role == "system"
    assert sum(t.role == "assistant" for t in kinds["multiturn"].turns) == 2
    for s in samples:
        assert s.perception_text() == ([s.meta["perception_reference"]] if s.meta["perception_reference"] else [])
        assert all("<perception>" not in t.text and "</perception>" not in t.text for t in s.turns)
        assert s.where == f"{shapes_data('sharegpt')}:{s.line}"


def test_image_paths_are_relative_to_the_data_file(shapes_data, tmp_path, monkeypatch):
    path = shapes_data("llamafactory")
    monkeypatch.chdir(tmp_path)  # a working directory that holds no images
    samples = load_samples(path)
    images = [p for s in samples for p in s.images]
    assert images and all(p.is_file() and p.parent == path.parent / "images" for p in images)


def test_absolute_paths_llava_image_key_and_trl_images_list(tmp_path, shapes_data):
    image = next((shapes_data("trl").parent / "images").iterdir()).resolve()
    lines = [
        {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}], "image": str(image)},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": "A."}], "images": [{"path": str(image), "bytes": None}]},
    ]  # fmt: skip
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines))
    first, second = load_samples(data)
    assert first.turns[0].parts == (ImagePart(image), "\nWhat?")
    assert second.turns[0].parts == (ImagePart(image), "What?")
    assert second.turns[1].text == "A."


def test_json_array_file(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 2))
    samples = load_samples(data)
    assert [s.line for s in samples] == [1, 2] and samples[1].turns[1].text == "Hello"


def test_perception_tags_and_regex():
    text, spans = perception_spans("Look. <perception>A red dot.</perception> So <perception>B</perception>!")
    assert text == "Look. A red dot. So B!" and [text[a:b] for a, b in spans] == ["A red dot.", "B"]
    assert perception_spans("no tags") == ("no tags", ())
    for bad in ("<perception>open", "close</perception>", "<perception>a<perception>b</perception>"):
        with pytest.raises(BadSample, match="unbalanced"):
            perception_spans(bad)
    text, spans = perception_spans("I see a cat. It is 2.", re.compile(r"^(.*?\.)"))
    assert [text[a:b] for a, b in spans] == ["I see a cat."]
    text, spans = perception_spans("[P]x[/P] y [P]z[/P]", re.compile(r"\[P\].*?\[/P\]"))
    assert [text[a:b] for a, b in spans] == ["[P]x[/P]", "[P]z[/P]"]


def test_perception_regex_option(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Seen: a dog. So yes."}]}))
    (sample,) = load_samples(data, perception_regex=r"Seen: (.*?\.)")
    assert sample.perception_text() == ["a dog."]
    with pytest.raises(ConfigError, match="perception_regex"):
        load_samples(data, perception_regex="(unclosed")


GOOD = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}], "images": ["img.png"]}
BAD_LINES = {
    "malformed JSON": '{"messages": [',
    "missing image file": json.dumps({**GOOD, "images": ["nope.png"]}),
    "unknown format": json.dumps({"text": "hello"}),
    "no assistant turn": json.dumps({"messages": [{"role": "user", "content": "Q"}]}),
    "image count mismatch": json.dumps({**GOOD, "images": ["img.png", "img.png"]}),
    "unknown role": json.dumps({"conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]}),
    "unbalanced perception tags": json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<perception>A"}]}),
    "remote image": json.dumps({**GOOD, "images": ["https://example.com/a.png"]}),
}


@pytest.fixture
def data_with(tmp_path, shapes_data):
    """``data_with(bad_line)``: a file of good lines with ``bad_line`` as line 3."""
    image = next((shapes_data("trl").parent / "images").iterdir())
    (tmp_path / "img.png").write_bytes(image.read_bytes())

    def make(bad: str) -> Path:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join([json.dumps(GOOD), json.dumps(GOOD), bad, "", json.dumps(GOOD)]) + "\n")
        return path

    return make


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_lines_stop_with_the_line_number_or_are_counted(data_with, reason):
    path = data_with(BAD_LINES[reason])
    with pytest.raises(DataError) as info:
        load_samples(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and reason in message and "\n" not in message
    stats = DataStats()
    samples = load_samples(path, skip_bad=True, stats=stats)
    assert [s.line for s in samples] == [1, 2, 5]
    assert stats.read == 4 and stats.skipped == {reason: 1} and stats.skipped_lines == {reason: [3]}


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_samples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no samples"):
        load_samples(tmp_path / "empty.jsonl")
    (tmp_path / "all-bad.jsonl").write_text("{\n[1]\n")
    with pytest.raises(DataError, match="all 2 samples are bad: 1 malformed JSON .line 1.; 1 unknown format .line 2."):
        load_samples(tmp_path / "all-bad.jsonl", skip_bad=True)


def test_max_samples(shapes_data):
    stats = DataStats()
    assert len(load_samples(shapes_data("trl"), max_samples=3, stats=stats)) == 3 and stats.read == 3
