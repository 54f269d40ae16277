"""data.json_stream: the top-level arrays of a JSON object one element at a time, equal to
json.load whatever the chunk size, with one-line errors for text that is not JSON."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import DataError
from data.json_stream import iter_top_level

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12,
)
documents = st.dictionaries(
    st.sampled_from(["images", "annotations", "info", "categories", "x"]),
    st.one_of(st.lists(values, max_size=6), values),
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(documents, st.sampled_from([1, 2, 3, 7, 64, 1 << 20]), st.booleans())
def test_elements_equal_json_load_for_any_chunk_size(tmp_path_factory, document, chunk, indent):
    path = tmp_path_factory.mktemp("json") / "d.json"
    path.write_text(json.dumps(document, indent=1 if indent else None))
    got: dict = {}
    keys: set[str] = set()
    for key, value, text in iter_top_level(path, {"images", "annotations", "categories"}, chunk=chunk, keys=keys):
        assert json.loads(text) == value
        if key in ("images", "annotations", "categories") and isinstance(document[key], list):
            got.setdefault(key, []).append(value)
        else:
            got[key] = value
    for key, value in document.items():
        if isinstance(value, list) and key in ("images", "annotations", "categories") and not value:
            got.setdefault(key, [])
    assert got == json.loads(path.read_text()) and keys == set(document)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a": [1, 2,, 3]}', "at character 12: Expecting value"),
        ('{"a": 1} trailing', "text after the top-level object"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a": 1', "expected ',' or '}' after a value, the file ends"),
        ('{"images": [1, 2', "expected ',' or ']' in the 'images' array, the file ends"),
        ('{"images": ["unterminated', "Unterminated string"),
        ("", "expected a JSON object, the file ends"),
    ],
)
def test_text_that_is_not_a_json_object_is_one_line_error(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    for chunk in (2, 1 << 20):
        with pytest.raises(DataError, match=message) as caught:
            list(iter_top_level(path, {"a", "images"}, chunk=chunk))
        assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_numbers_cut_by_a_chunk_end_are_read_whole(tmp_path):
    path = tmp_path / "n.json"
    path.write_text('{"a": [12345678, 2.5e10, -1.25E-3, 7], "b": 1}')
    for chunk in range(1, 12):
        assert [v for _, v, _ in iter_top_level(path, {"a"}, chunk=chunk)] == [12345678, 2.5e10, -1.25e-3, 7, 1]


def test_not_utf8_and_missing_files(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_top_level(path, set()))
    with pytest.raises(DataError, match="file not found"):
        list(iter_top_level(tmp_path / "none.json", set()))
