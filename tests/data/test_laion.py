"""The laion subcommand end to end: the real img2dataset downloads from a local HTTP server on
127.0.0.1 (good images, 404s, a corrupt image, a slow one, an X-Robots-Tag opt-out), and we check
the exact counts, sizes.json, manifest.json, resume, and that every written sample decodes.
Bad metadata files end in one-line errors before any download."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from data_tools import cli
from data_tools.errors import DataError
from data_tools.laion import (DownloadOptions, Filters, convert, failure_reason, filter_rows,
                              options_from_cli, read_metadata)
from tests.helpers.http_server import ImageServer, corrupt_route, image_route

MAX_SIZE = 64
SAMPLES_PER_SHARD = 4
# (width, height) of the good images: some larger than MAX_SIZE (resized), some smaller (kept)
GOOD_SIZES = [(160, 120), (120, 160), (200, 100), (64, 64), (48, 40), (300, 90), (90, 90),
              (70, 140), (256, 192)]


def good_path(i: int) -> str:
    return f"/img/{i}.jpg"


@pytest.fixture(scope="module")
def server():
    routes = {good_path(i): image_route(w, h, seed=i) for i, (w, h) in enumerate(GOOD_SIZES)}
    routes["/corrupt.jpg"] = corrupt_route()
    routes["/slow-ok.jpg"] = image_route(100, 80, seed=50, delay_s=0.3)
    routes["/slow-timeout.jpg"] = image_route(100, 80, seed=51, delay_s=2.5)
    routes["/noai.jpg"] = image_route(80, 80, seed=52, headers={"X-Robots-Tag": "noai"})
    with ImageServer(routes) as s:
        yield s


def laion_table(server: ImageServer) -> tuple[pd.DataFrame, dict]:
    """20 LAION-style rows and what must become of each: 10 written, 5 failed downloads,
    5 dropped by the filters before any download."""
    rows = []  # (path, caption, similarity, NSFW, WIDTH)
    for i, (w, h) in enumerate(GOOD_SIZES):
        rows.append((good_path(i), f"  good   image {i}\n", 0.35, "UNLIKELY", w))
    rows += [("/slow-ok.jpg", "slow but in time", 0.4, "UNLIKELY", 100),
             ("/missing-1.jpg", "a 404", 0.4, "UNLIKELY", 100),
             ("/missing-2.jpg", "another 404", 0.4, "UNSURE", 100),
             ("/corrupt.jpg", "not an image", 0.4, "UNLIKELY", 100),
             ("/slow-timeout.jpg", "too slow", 0.4, "UNLIKELY", 100),
             ("/noai.jpg", "opted out", 0.4, "UNLIKELY", 80),
             # dropped by filters
             ("/img/0.jpg", "duplicate url", 0.4, "UNLIKELY", 160),
             ("/img/1.jpg?blank", "   ", 0.4, "UNLIKELY", 120),
             ("/img/2.jpg?low", "low similarity", 0.1, "UNLIKELY", 200),
             ("/img/3.jpg?nsfw", "tagged nsfw", 0.4, "NSFW", 64),
             ("/img/4.jpg?small", "metadata says tiny", 0.4, "UNLIKELY", 20)]
    table = pd.DataFrame(rows, columns=["path", "TEXT", "similarity", "NSFW", "WIDTH"])
    table.insert(0, "URL", table.pop("path").map(server.url))
    expected = {
        "written": {server.url(good_path(i)): f"good image {i}" for i in range(len(GOOD_SIZES))}
        | {server.url("/slow-ok.jpg"): "slow but in time"},
        "skipped": {"http_404": 2, "corrupt_image": 1, "timeout": 1,
                    "disallowed_by_x_robots_tag": 1, "duplicate_url": 1, "empty_caption": 1,
                    "low_similarity": 1, "nsfw": 1, "metadata_too_small": 1},
    }
    return table, expected


FILTERS = Filters(min_similarity=0.28, nsfw_allowed=("UNLIKELY", "UNSURE"), min_width=32)
OPTIONS = DownloadOptions(image_size=MAX_SIZE, samples_per_shard=SAMPLES_PER_SHARD, processes=1,
                          threads=8, timeout=1, retries=1)
# the same conversion on the command line
CLI_ARGS = ["--min-similarity", "0.28", "--nsfw-allowed", "UNLIKELY,UNSURE", "--min-width", "32",
            "--max-size", str(MAX_SIZE), "--samples-per-shard", str(SAMPLES_PER_SHARD),
            "--workers", "1", "--threads", "8", "--timeout", "1", "--retries", "1"]


def read_samples(out_dir: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """{shard name: {key: {ext: bytes}}} read with tarfile, independently of our code."""
    shards = {}
    for tar_path in sorted(out_dir.glob("*.tar")):
        samples = defaultdict(dict)
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
        shards[tar_path.name] = dict(samples)
    return shards


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    """One real download through the CLI entry point (in process; img2dataset spawns its own
    worker processes)."""
    work = tmp_path_factory.mktemp("laion")
    table, expected = laion_table(server)
    metadata = work / "meta.parquet"
    table.to_parquet(metadata)
    out = work / "shards"
    assert cli.main(["laion", str(metadata), str(out), *CLI_ARGS]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    return {"metadata": metadata, "out": out, "manifest": manifest, "expected": expected,
            "hits": dict(server.hits)}


@pytest.mark.slow  # shares the real download (img2dataset spawns processes)
def test_counts_and_reasons_are_exact(downloaded):
    manifest, expected = downloaded["manifest"], downloaded["expected"]
    assert manifest["written"] == len(expected["written"]) == 10
    assert manifest["skipped"] == dict(sorted(expected["skipped"].items()))
    assert manifest["items"] == manifest["metadata_rows"] == 20
    assert manifest["downloaded_rows"] == 15
    assert manifest["source"] == "laion"
    assert manifest["img2dataset"]["unfinished_shards"] == []
    assert manifest["plan"] == (downloaded["out"] / ".laion-plan").read_text().strip()
    assert manifest["arguments"]["min_similarity"] == 0.28
    assert manifest["arguments"]["disallowed_header_directives"] == [
        "noai", "noimageai", "noindex", "noimageindex"]  # img2dataset's default is honoured
    # the raw img2dataset messages behind our reasons are kept as examples
    assert "404" in manifest["skipped_examples"]["http_404"][0]["detail"]


@pytest.mark.slow  # shares the real download (img2dataset spawns processes)
def test_every_sample_decodes_with_its_caption_and_size(downloaded):
    shards = read_samples(downloaded["out"])
    assert list(shards) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]  # 15 rows / 4
    written = {}
    for samples in shards.values():
        for key, members in samples.items():
            assert set(members) == {"jpg", "txt", "json"}, key
            meta = json.loads(members["json"])
            image = Image.open(io.BytesIO(members["jpg"]))
            image.load()
            original = (meta["original_width"], meta["original_height"])
            assert min(image.size) == min(MAX_SIZE, min(original))  # shorter side, no upscale
            assert image.size == (meta["width"], meta["height"])
            written[meta["url"]] = members["txt"].decode()
    assert written == downloaded["expected"]["written"]  # captions cleaned of extra whitespace


@pytest.mark.slow  # shares the real download (img2dataset spawns processes)
def test_sizes_json_and_shard_hashes_match_the_tars(downloaded):
    out, manifest = downloaded["out"], downloaded["manifest"]
    sizes = json.loads((out / "sizes.json").read_text())
    counted = {name: len(samples) for name, samples in read_samples(out).items()}
    assert sizes == counted
    assert sum(sizes.values()) == 10
    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
        assert shard["count"] == sizes[shard["name"]]
    assert json.loads((out / "manifest.json").read_text()) == manifest


@pytest.mark.slow  # shares the real download (img2dataset spawns processes)
def test_open_clip_size_detection_reads_our_sizes_json(downloaded):
    """OpenCLIP's trainer counts img2dataset's shards through the sizes.json we add."""
    open_clip_data = pytest.importorskip("open_clip_train.data")
    pattern = str(downloaded["out"] / "{00000..00003}.tar")
    assert open_clip_data.get_dataset_size(pattern) == (10, 4)


@pytest.mark.slow  # shares the real download (img2dataset spawns processes)
def test_retries_and_timeouts_reach_the_server(downloaded, server):
    hits = downloaded["hits"]
    assert hits["/slow-timeout.jpg"] == 2          # one try + --retries 1
    assert hits["/missing-1.jpg"] == 2
    assert hits[good_path(0)] == 1                 # the duplicate row was never requested
    assert "/img/2.jpg?low" not in hits            # filtered rows are never requested


@pytest.mark.slow  # shares the real download (img2dataset spawns processes)
def test_rerun_resumes_only_unfinished_shards(downloaded, server):
    out = downloaded["out"]
    before = json.loads((out / "sizes.json").read_text())
    # an interrupted run: img2dataset had not finished shard 1 (its stats file comes last)
    (out / "00001_stats.json").unlink()
    (out / "00001.tar").write_bytes(b"partial")
    hits_before = dict(server.hits)
    manifest = convert(downloaded["metadata"], out, filters=FILTERS, options=OPTIONS)
    new_hits = {p: n - hits_before.get(p, 0) for p, n in server.hits.items()
                if n != hits_before.get(p, 0)}
    # shard 1 holds rows 4..7 of the kept rows: images 4..7
    assert set(new_hits) == {good_path(i) for i in range(4, 8)}
    assert json.loads((out / "sizes.json").read_text()) == before
    assert manifest["written"] == 10
    assert manifest["skipped"] == downloaded["manifest"]["skipped"]

    # a complete folder: nothing is requested at all
    hits_before = dict(server.hits)
    assert convert(downloaded["metadata"], out, filters=FILTERS, options=OPTIONS)["written"] == 10
    assert server.hits == hits_before


@pytest.mark.slow  # shares the real download (img2dataset spawns processes)
def test_other_download_into_the_same_folder_is_refused(downloaded):
    with pytest.raises(DataError, match="different download.*--overwrite"):
        convert(downloaded["metadata"], downloaded["out"], filters=Filters(),
                options=OPTIONS)


class _NoServer:
    """laion_table's URLs without a running server (for tests that download nothing)."""

    @staticmethod
    def url(path: str) -> str:
        return f"http://127.0.0.1:9{path}"


def write_table(table: pd.DataFrame, path: Path) -> None:
    fmt = path.suffix[1:]
    if fmt == "parquet":
        table.to_parquet(path)
    elif fmt in ("csv", "tsv"):
        table.to_csv(path, index=False, sep="," if fmt == "csv" else "\t")
    else:
        table.to_json(path, orient="records", lines=True, force_ascii=False)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_every_metadata_format_filters_the_same(tmp_path, fmt):
    table, expected = laion_table(_NoServer())
    path = tmp_path / f"meta.{fmt}"
    write_table(table, path)
    filtered = filter_rows(read_metadata(path), "URL", "TEXT", FILTERS)
    assert list(filtered.rows["url"]) == list(table["URL"][:15])
    assert list(filtered.rows["caption"][:2]) == ["good image 0", "good image 1"]
    assert list(filtered.rows.columns) == ["url", "caption", "similarity", "NSFW", "WIDTH"]
    filter_reasons = {"duplicate_url", "empty_caption", "low_similarity", "nsfw",
                      "metadata_too_small"}
    assert dict(filtered.skipped) == {r: n for r, n in expected["skipped"].items()
                                      if r in filter_reasons}


def test_cli_options_are_the_api_options():
    args = cli.build_parser().parse_args(["laion", "m.parquet", "out", *CLI_ARGS])
    assert options_from_cli(args) == (FILTERS, OPTIONS)


def test_robots_check_can_be_turned_off():
    """img2dataset reads None as "its default list" and [] as "no check": an empty
    --disallowed-header-directives must reach it as []."""
    args = cli.build_parser().parse_args(
        ["laion", "m.csv", "out", "--disallowed-header-directives", ""])
    _, options = options_from_cli(args)
    assert options.download_kwargs()["disallowed_header_directives"] == []
    assert DownloadOptions().download_kwargs()["disallowed_header_directives"] == [
        "noai", "noimageai", "noindex", "noimageindex"]


# ---------------------------------------------------------------- bad metadata: one line, exit 2


def run_cli(args, capsys) -> tuple[int, str]:
    status = cli.main(["laion", *map(str, args)])
    return status, capsys.readouterr().err


def write_bad(path: Path, kind: str) -> Path:
    if kind == "parquet_missing_caption":
        pd.DataFrame({"URL": ["http://127.0.0.1:9/a.jpg"], "caption": ["x"]}).to_parquet(path)
    elif kind == "parquet_garbage":
        path.write_bytes(b"PAR1 this is not a parquet file at all")
    elif kind == "csv_ragged":
        path.write_text('URL,TEXT\nhttp://127.0.0.1:9/a.jpg,fine\n'
                        'http://x/b.jpg,"a,b",extra,more\n')
    elif kind == "jsonl_broken":
        path.write_text('{"URL": "http://127.0.0.1:9/a.jpg", "TEXT": "ok"}\n{"URL": broken\n')
    elif kind == "csv_no_similarity":
        path.write_text("URL,TEXT\nhttp://127.0.0.1:9/a.jpg,fine\n")
    elif kind == "csv_all_filtered":
        path.write_text("URL,TEXT\nhttp://127.0.0.1:9/a.jpg,   \nnot-a-url,caption\n")
    elif kind == "csv_non_utf8":
        path.write_bytes(b"URL,TEXT\nhttp://127.0.0.1:9/a.jpg,caf\xe9\n")
    return path


@pytest.mark.parametrize("name, kind, extra, message", [
    ("m.parquet", "parquet_missing_caption", [],
     r"m\.parquet has no column 'TEXT' \(needed by --caption-col\)"),
    ("m.parquet", "parquet_garbage", [], r"m\.parquet: not a readable parquet file"),
    ("m.csv", "csv_ragged", [], r"m\.csv: not a readable csv file \(.*Expected 2 fields in line 3"),
    ("m.jsonl", "jsonl_broken", [], r"m\.jsonl line 2: not valid JSON"),
    ("m.csv", "csv_no_similarity", ["--min-similarity", "0.3"],
     r"no column 'similarity' \(needed by --min-similarity\)"),
    ("m.csv", "csv_all_filtered", [],
     r"no row left after filtering \((empty_caption: 1, invalid_url: 1|invalid_url: 1, "
     r"empty_caption: 1)\)"),
    ("m.csv", "csv_non_utf8", [], r"m\.csv: not a readable csv file"),
    ("m.txt", "csv_no_similarity", [], r"cannot tell the metadata format .*--input-format"),
    ("absent.csv", None, [], r"metadata file .*absent\.csv does not exist"),
])
def test_bad_metadata_is_one_line_error(tmp_path, capsys, name, kind, extra, message):
    path = write_bad(tmp_path / name, kind) if kind else tmp_path / name
    status, err = run_cli([path, tmp_path / "out", *extra], capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("clip-data laion: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_unwritable_output_folder_is_one_line_error(tmp_path, capsys):
    metadata = write_bad(tmp_path / "m.csv", "csv_no_similarity")  # a valid one-row table
    (tmp_path / "file").write_text("a file, not a folder")
    status, err = run_cli([metadata, tmp_path / "file" / "out"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "output folder" in err and "is not writable" in err


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--samples-per-shard", "0"], "--samples-per-shard must be at least 1"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    status, err = run_cli([tmp_path / "m.csv", tmp_path / "out", *args], capsys)
    assert status == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("status, message, reason", [
    ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_503"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive",
     "disallowed_by_x_robots_tag"),
    ("failed_to_resize", "Image decoding error", "corrupt_image"),
    ("failed_to_resize", "image too small", "image_too_small"),
])
def test_failure_reasons(status, message, reason):
    assert failure_reason(status, message) == reason
