"""kdcache.pipeline.data.corpus: every format streams the same documents with stable sources,
and every failure names the file and where in it."""

from __future__ import annotations

import bz2
import hashlib
import json
import tracemalloc

import fsspec
import pytest
import zstandard

from kdcache.pipeline.data.corpus import CorpusSpec, CorpusStats, Document, iter_documents


def read(paths, **kw) -> list[Document]:
    return list(iter_documents(CorpusSpec(paths if isinstance(paths, list) else [str(paths)], **kw)))


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["txt", "txt.zst", "jsonl", "jsonl.zst", "json", "csv", "csv.bz2", "parquet",
                                 "hf_disk"])
def test_each_format_round_trips_with_sources(corpus_files, sample_docs, fmt):
    path = str(corpus_files[fmt])
    labelled = not fmt.startswith("txt")
    docs = read(path, label_field="label" if labelled else None)
    assert [d.text for d in docs] == [text for text, _ in sample_docs]
    assert [d.source for d in docs] == [f"{path}:{i}" for i in range(len(sample_docs))]
    assert [d.label for d in docs] == [label if labelled else None for _, label in sample_docs]


def test_hf_builder_streaming(corpus_files, sample_docs):
    path = str(corpus_files["jsonl"])
    docs = read(path, format="hf:json", label_field="label")
    expected = [(text, f"{path}:{i}", label) for i, (text, label) in enumerate(sample_docs)]
    assert [(d.text, d.source, d.label) for d in docs] == expected


def test_wikipedia_extracts_object_of_objects(tmp_path):
    pages = {"12": {"title": "Film", "extract": "the film was good", "pageid": 12},
             "7": {"title": "Plot", "extract": "a story with a plot", "pageid": 7},
             "9": {"title": "Empty", "extract": "", "pageid": 9}}
    path = tmp_path / "wiki_extracts.json"
    path.write_text(json.dumps(pages))
    docs = read(path, text_field="extract")
    assert [(d.text, d.source) for d in docs] == [
        ("the film was good", f"{path}:0"), ("a story with a plot", f"{path}:1")]


def test_rotten_tomatoes_labels_and_include_filter(tmp_path):
    rows = "category,text\nfresh,a great film\nplot,\"a man, a plan\"\nrotten,a bad movie\nfresh,good\n"
    path = tmp_path / "rotten_tomatoes_corpus_full.csv.bz2"
    path.write_bytes(bz2.compress(rows.encode()))
    stats = CorpusStats()
    spec = CorpusSpec([str(path)], label_field="category", label_map={"rotten": 0, "fresh": 1},
                      include_labels=["fresh", "rotten"])
    docs = list(iter_documents(spec, stats))
    assert [(d.text, d.label, d.source) for d in docs] == [
        ("a great film", 1, f"{path}:0"), ("a bad movie", 0, f"{path}:2"), ("good", 1, f"{path}:3")]
    assert stats.skipped_label == 1
    # include_labels may also name the mapped ints.
    assert [d.label for d in read(path, label_field="category", label_map={"rotten": 0, "fresh": 1},
                                  include_labels=[0])] == [0]
    # Without the filter, "plot" has no int to map to: the error names the record and the map.
    with pytest.raises(ValueError, match=r":1: label 'plot'.*'fresh', 'rotten'"):
        read(path, label_field="category", label_map={"rotten": 0, "fresh": 1})


def test_txt_block_mode(tmp_path):
    path = tmp_path / "blocks.txt"
    path.write_text("first block\nstill first\n\n\n  \nsecond block\r\n\nthird\n")
    docs = read(path, txt_mode="block")
    assert [(d.text, d.source) for d in docs] == [
        ("first block\nstill first", f"{path}:0"), ("second block", f"{path}:1"), ("third", f"{path}:2")]


def test_txt_line_mode_skips_blank_lines_but_counts_them_in_sources(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes(b"\xef\xbb\xbfone\n\n   \ntwo\r\nthree")  # BOM, blanks, CRLF, no final newline
    docs = read(path)
    assert [(d.text, d.source) for d in docs] == [("one", f"{path}:0"), ("two", f"{path}:3"), ("three", f"{path}:4")]


def test_fsspec_memory_urls_with_glob():
    fs = fsspec.filesystem("memory")
    fs.pipe("/kdcache-test/b.jsonl", b'{"text": "bee"}\n')
    fs.pipe("/kdcache-test/a.jsonl", b'{"text": "ay"}\n{"text": "ay two"}\n')
    try:
        docs = read(["memory://kdcache-test/*.jsonl"])
        assert [(d.text, d.source) for d in docs] == [
            ("ay", "memory:///kdcache-test/a.jsonl:0"), ("ay two", "memory:///kdcache-test/a.jsonl:1"),
            ("bee", "memory:///kdcache-test/b.jsonl:0")]
        assert [d.source for d in read(["memory://kdcache-test/b.jsonl"])] == ["memory://kdcache-test/b.jsonl:0"]
    finally:
        fs.rm("/kdcache-test", recursive=True)


def test_s3_urls_stream_through_fsspec(monkeypatch):
    """Remote files (fsspec AbstractBufferedFile) behind a local moto S3 server."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(key, value)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("corpus-bucket")
        fs.pipe("corpus-bucket/d/a.txt", b"ay\nay two\n")
        fs.pipe("corpus-bucket/d/b.jsonl.zst", zstandard.ZstdCompressor().compress(b'{"text": "bee"}\n'))
        fs.pipe("corpus-bucket/d/c.csv.bz2", bz2.compress(b"text\nsee\n"))
        docs = read(["s3://corpus-bucket/d/*"])
        assert [(d.text, d.source) for d in docs] == [
            ("ay", "s3://corpus-bucket/d/a.txt:0"), ("ay two", "s3://corpus-bucket/d/a.txt:1"),
            ("bee", "s3://corpus-bucket/d/b.jsonl.zst:0"), ("see", "s3://corpus-bucket/d/c.csv.bz2:0")]
    finally:
        server.stop()
        # fsspec caches filesystem instances by their arguments, not by the AWS_* environment: a
        # later test's server on another port must not be reached through this one's client.
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------
# Determinism and paths
# ---------------------------------------------------------------------------


def test_glob_order_is_sorted_and_passes_are_identical(tmp_path):
    for name in ("c", "a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"{name} one\n{name} two\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("d one\n")
    spec = CorpusSpec([str(tmp_path / "**" / "*.txt")])
    first, second = list(iter_documents(spec)), list(iter_documents(spec))
    assert first == second
    assert [d.text for d in first] == ["a one", "a two", "b one", "b two", "c one", "c two", "d one"]


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here-.*glob pattern matched no files"):
        read(str(tmp_path / "nothing-here-*.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read(str(tmp_path / "missing.txt"))


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="empty corpus: no documents in 2 file"):
        read([str(tmp_path / "blank.txt"), str(tmp_path / "empty.jsonl")])


# ---------------------------------------------------------------------------
# Errors name the file and the place
# ---------------------------------------------------------------------------


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 3: not valid JSON"):
        read(path)


def test_jsonl_missing_field_lists_fields_present(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text('{"text": "ok", "label": 1}\n{"body": "no text", "id": 2}\n')
    fields = r"\(fields present: \['body', 'id'\]\)"
    with pytest.raises(ValueError, match=rf"{path}: line 2: missing text field 'text' {fields}"):
        read(path)
    path.write_text('{"text": "ok", "label": 1}\n{"text": "no label"}\n')
    with pytest.raises(ValueError, match=r"line 2: missing label field 'label' \(fields present: \['text'\]\)"):
        read(path, label_field="label")


def test_missing_column_lists_columns(corpus_files):
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: \['text', 'label'\]\)"):
        read(corpus_files["parquet"], text_field="body")
    with pytest.raises(ValueError, match=r"no column 'body'"):
        read(corpus_files["csv.bz2"], text_field="body")


def test_non_utf8_strict_names_byte_offset_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine\ncaf\xe9 au lait\nalso fine\n")
    with pytest.raises(ValueError, match=rf"{path}: invalid UTF-8 byte 0xe9 at byte offset 8 \(line 2\)"):
        read(path)


@pytest.mark.parametrize("name,data", [
    ("bad.txt", b"fine\ncaf\xe9\nalso fine\n"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n'),
    ("bad.csv", b"text\nfine\ncaf\xe9\nalso fine\n"),
])
def test_non_utf8_skip_mode_drops_and_counts(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    stats = CorpusStats()
    docs = list(iter_documents(CorpusSpec([str(tmp_path / name)], encoding_errors="skip"), stats))
    assert [d.text for d in docs] == ["fine", "also fine"]
    assert stats.skipped_encoding == 1
    if name.endswith(".csv"):
        with pytest.raises(ValueError, match=r"bad.csv: invalid UTF-8 in row 1 \(line 3\)"):
            read(tmp_path / name)


def test_truncated_compressed_files_name_the_file(tmp_path):
    data = b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(500))
    comp = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "cut.jsonl.zst").write_bytes(comp[: len(comp) // 2])
    with pytest.raises(ValueError, match=r"cut.jsonl.zst: truncated zstd file"):
        read(tmp_path / "cut.jsonl.zst")
    (tmp_path / "cut2.jsonl.zst").write_bytes(comp[:-3])  # only the end of the last block is missing
    with pytest.raises(ValueError, match=r"cut2.jsonl.zst: truncated zstd file"):
        read(tmp_path / "cut2.jsonl.zst")
    bz = bz2.compress(data)
    (tmp_path / "cut.csv.bz2").write_bytes(bz[: len(bz) // 2])
    with pytest.raises(ValueError, match=r"cut.csv.bz2: cannot read"):
        read(tmp_path / "cut.csv.bz2")


def test_multi_frame_zst_reads_across_frames(tmp_path):
    c = zstandard.ZstdCompressor(write_checksum=True)
    path = tmp_path / "frames.txt.zst"
    path.write_bytes(c.compress(b"one\ntwo\n") + c.compress(b"three\n"))
    assert [d.text for d in read(path)] == ["one", "two", "three"]


# ---------------------------------------------------------------------------
# Long records: bounded memory, pieces that concatenate back
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["huge.txt", "huge.txt.zst"])
def test_20mb_single_line_streams_in_pieces_with_bounded_memory(tmp_path, name):
    path = tmp_path / name
    line = ("the film was good and the plot was long é " * 480_000).encode()  # ~20 MB, no newline inside
    assert len(line) > 20_000_000
    data = b"short one\n" + line + b"\nshort two\n"
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if name.endswith(".zst") else data)
    del data
    digest = hashlib.sha256(line).hexdigest()
    del line

    max_chars = 1_000_000
    tracemalloc.start()
    try:
        h, parts, n_short = hashlib.sha256(), [], 0
        for doc in iter_documents(CorpusSpec([str(path)], max_doc_chars=max_chars)):
            if doc.part is None:
                n_short += 1
                continue
            assert len(doc.text) <= max_chars and doc.source == f"{path}:1#{doc.part}"
            parts.append(doc.part)
            h.update(doc.text.encode())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n_short == 2
    assert parts == list(range(len(parts))) and len(parts) >= 20
    assert h.hexdigest() == digest  # the pieces concatenate back to the line
    assert peak < 10_000_000, f"peak {peak} bytes while streaming a 20 MB line"


def test_long_jsonl_text_is_cut_into_pieces(tmp_path):
    text = " ".join(f"word{i}" for i in range(200))
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": text, "label": 3}) + "\n")
    docs = read(path, max_doc_chars=100, label_field="label")
    assert len(docs) > 5 and all(len(d.text) <= 100 for d in docs)
    assert "".join(d.text for d in docs) == text
    assert [d.source for d in docs] == [f"{path}:0#{i}" for i in range(len(docs))]
    assert {d.label for d in docs} == {3} and {d.record_id for d in docs} == {f"{path}:0"}


def test_block_mode_long_block_is_cut_at_line_boundaries(tmp_path):
    lines = [f"line number {i} of the block" for i in range(40)]
    path = tmp_path / "long_block.txt"
    path.write_text("\n".join(lines) + "\n\nnext block\n")
    docs = read(path, txt_mode="block", max_doc_chars=200)
    pieces = [d for d in docs if d.record_id == f"{path}:0"]
    assert len(pieces) > 3 and all(len(d.text) <= 200 for d in pieces)
    assert "".join(d.text for d in pieces) == "\n".join(lines)
    assert docs[-1].source == f"{path}:1" and docs[-1].text == "next block"
