"""coco, karpathy, csv and folder converters through the CLI, on fixtures with bad input:
every input item is written or counted as skipped by reason; bad files stop with one line."""
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.verify import verify_folder
from tests.data.conftest import GOOD


def run_cli(*args):
    return main([str(a) for a in args] + ["--no-progress"])


def samples_of(folder):
    samples = {}
    for shard in sorted(p for p in folder.glob("*.tar") if not p.is_symlink()):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def manifest_of(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_coco_counts_every_item_and_keeps_all_captions(coco_fixture, tmp_path, capsys):
    captions, images, written, skipped = coco_fixture
    out = tmp_path / "out"
    assert run_cli("coco", out, "--captions", captions, "--images", images,
                   "--samples-per-shard", "4", "--max-size", "32") == 0
    manifest = manifest_of(out)
    assert manifest["written"] == written
    assert manifest["skipped"] == skipped
    assert manifest["items"] == written + sum(skipped.values())
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == written
    samples = samples_of(out)
    assert len(samples) == written
    first = samples["000000000"]
    meta = json.loads(first["json"])
    assert first["txt"] == b"picture number 1"
    # captions belong to the image id: those added with the duplicate entry land here too
    assert meta["captions"] == ["picture number 1", "a duplicate of image 1"]
    assert meta["image_id"] == 1
    assert meta["source"] == "coco" and meta["file_name"] == "rgb.jpg"
    assert (meta["original_width"], meta["original_height"]) == (400, 300)
    assert (meta["width"], meta["height"]) == (43, 32) == Image.open(io.BytesIO(first["jpg"])).size
    # keys follow the plan: the 10 good images are items 0..9, bad ones leave gaps after them
    assert sorted(samples) == [f"{i:09d}" for i in range(len(GOOD))]
    assert "skipped: annotation_without_image 1" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON: Expecting property name"),
    ('{"images": []}', "missing key 'annotations'"),
    ('{"images": {}, "annotations": []}', "'images' must be a list"),
    (b"{\"images\": \"\xff\"}", "is not UTF-8 JSON"),
])
def test_coco_malformed_json_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "captions.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert run_cli("coco", tmp_path / "out", "--captions", path, "--images", tmp_path) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_inputs_and_unwritable_output_fail_before_work(tmp_path, capsys, coco_fixture):
    captions, images, _, _ = coco_fixture
    assert run_cli("coco", tmp_path / "o", "--captions", tmp_path / "nope.json",
                   "--images", images) == 2
    assert "nope.json does not exist" in capsys.readouterr().err
    assert run_cli("coco", tmp_path / "o", "--captions", captions,
                   "--images", tmp_path / "noimages") == 2
    assert "--images" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run_cli("coco", blocker / "out", "--captions", captions, "--images", images) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and err.count("\n") == 1


def write_karpathy(tmp_path, zoo_folder):
    def image(split, filename, n, cocoid, filepath="."):
        return {"split": split, "filepath": filepath, "filename": filename, "cocoid": cocoid,
                "sentences": [{"raw": f"caption {k} of {filename}"} for k in range(n)]}

    images = [image("train", "rgb.jpg", 2, 1), image("train", "gray.png", 1, 2),
              image("test", "cmyk.jpg", 5, 3), image("test", "palette.png", 5, 4),
              image("test", "zero.jpg", 5, 5), image("test", "cmyk.jpg", 5, 3),
              image("val", "rgba.png", 5, 6)]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def test_karpathy_writes_one_set_per_split_with_all_captions(zoo, tmp_path):
    folder = next(iter(zoo.values()))[0].parent
    annotations = write_karpathy(tmp_path, folder)
    out = tmp_path / "out"
    assert run_cli("karpathy", out, "--annotations", annotations, "--images", folder) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    test = manifest_of(out / "test")
    assert test["written"] == 2
    assert test["skipped"] == {"duplicate_id": 1, "empty_image": 1}
    assert test["source"] == "karpathy-coco"
    for sample in samples_of(out / "test").values():
        meta = json.loads(sample["json"])
        assert len(meta["captions"]) == 5 and meta["split"] == "test"
        assert meta["captions"][0] == sample["txt"].decode()
    assert manifest_of(out / "train")["written"] == 2
    # writing only one split later reuses the shards (same arguments apart from --splits)
    stamp = (out / "test" / "shard-000000.tar").stat().st_mtime_ns
    assert run_cli("karpathy", out, "--annotations", annotations, "--images", folder,
                   "--splits", "test") == 0
    assert (out / "test" / "shard-000000.tar").stat().st_mtime_ns == stamp


def test_karpathy_bad_split_and_bad_entry(zoo, tmp_path, capsys):
    folder = next(iter(zoo.values()))[0].parent
    annotations = write_karpathy(tmp_path, folder)
    assert run_cli("karpathy", tmp_path / "o", "--annotations", annotations, "--images", folder,
                   "--splits", "restval") == 2
    assert "has no split 'restval' (it has: test, train, val)" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"split": "test", "sentences": []}]}))
    assert run_cli("karpathy", tmp_path / "o", "--annotations", bad, "--images", folder) == 2
    assert "images[0]: missing key 'filename'" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_table_formats(zoo, tmp_path, fmt):
    import pandas

    folder = next(iter(zoo.values()))[0].parent
    rows = [{"filepath": str(folder / "rgb.jpg"), "caption": "one"},
            {"filepath": "gray.png", "caption": "two"},          # relative to --image-root
            {"filepath": "zero.jpg", "caption": "three"},
            {"filepath": "rgba.png", "caption": " \t"},
            {"filepath": "", "caption": "four"}]
    table = tmp_path / f"table.{fmt}"
    frame = pandas.DataFrame(rows)
    if fmt == "parquet":
        frame.to_parquet(table)
    elif fmt == "jsonl":
        frame.to_json(table, orient="records", lines=True)
    else:
        frame.to_csv(table, sep="\t" if fmt == "tsv" else ",", index=False)
    out = tmp_path / "out"
    assert run_cli("csv", table, out, "--image-root", folder) == 0
    manifest = manifest_of(out)
    assert manifest["written"] == 2
    assert manifest["skipped"] == {"empty_image": 1, "empty_caption": 1,
                                   "missing_image_path": 1}
    assert [s["txt"] for s in samples_of(out).values()] == [b"one", b"two"]


def test_csv_bad_rows_are_counted_and_bad_files_are_errors(zoo, tmp_path, capsys):
    folder = next(iter(zoo.values()))[0].parent
    table = tmp_path / "t.csv"
    table.write_bytes(b"filepath,caption,id\nrgb.jpg,ok,1\ngray.png,short row\n"
                      b"gray.png,dup,1\nnot_there.jpg,gone,2\ncmyk.jpg,fine,3\n"
                      b"rgba.png,caf\xe9 latin-1,4\n")
    assert run_cli("csv", table, tmp_path / "o", "--image-root", folder, "--id-column", "id") == 0
    manifest = manifest_of(tmp_path / "o")
    assert manifest["written"] == 2
    assert manifest["skipped"] == {"malformed_row": 1, "duplicate_id": 1, "missing_image": 1,
                                   "non_utf8_caption": 1}
    capsys.readouterr()

    lines = tmp_path / "t.jsonl"
    lines.write_text('{"filepath": "rgb.jpg", "caption": "a"}\n{broken\n[1, 2]\n')
    assert run_cli("csv", lines, tmp_path / "j", "--image-root", folder) == 0
    assert manifest_of(tmp_path / "j")["skipped"] == {"malformed_row": 2}

    for content, message in [("path,text\nrgb.jpg,a\n", "no column 'filepath' (columns: "
                              "path, text)"),
                             (b"file\xffpath,caption\nx,y\n", "no column 'filepath'"),
                             ("", "is empty: expected a header row")]:
        table.write_bytes(content if isinstance(content, bytes) else content.encode())
        assert run_cli("csv", table, tmp_path / "o2", "--image-root", folder) == 2
        err = capsys.readouterr().err
        assert message in err and str(table) in err and err.count("\n") == 1
    broken = tmp_path / "t.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert run_cli("csv", broken, tmp_path / "o3") == 2
    assert "cannot be read as parquet" in capsys.readouterr().err


def test_folder_writes_a_clip_benchmark_layout(zoo, tmp_path):
    root = tmp_path / "tree"
    for classname, names in {"red_apple": ["rgb.jpg", "cmyk.jpg"],
                             "dog": ["gray.png", "random.jpg"]}.items():
        (root / classname).mkdir(parents=True)
        for name in names:
            os.link(zoo[name][0], root / classname / name)
    (root / "dog" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run_cli("folder", root, out, "--samples-per-shard", "2") == 0
    test = out / "test"
    manifest = manifest_of(test)
    assert manifest["written"] == 3
    assert manifest["skipped"] == {"corrupt_image": 1, "not_an_image": 1}
    for folder in (out, test):
        assert (folder / "classnames.txt").read_text() == "dog\nred apple\n"
        assert "{c}" in (folder / "zeroshot_classification_templates.txt").read_text()
    assert (test / "nshards.txt").read_text() == "2\n"
    assert os.readlink(test / "0.tar") == "shard-000000.tar"
    samples = samples_of(test).values()
    labels = {json.loads(s["json"])["file"]: int(s["cls"]) for s in samples}
    assert sorted(s["txt"] for s in samples) == [b"dog", b"red apple", b"red apple"]
    assert labels == {"dog/gray.png": 0, "red_apple/cmyk.jpg": 1, "red_apple/rgb.jpg": 1}
    report = verify_folder(test)  # the 0.tar links are not counted twice
    assert (report["shards"], report["valid"], report["corrupt"]) == (2, 3, [])


def test_folder_without_classes_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli("folder", tmp_path / "empty", tmp_path / "o") == 2
    assert "has no class subfolders" in capsys.readouterr().err
